"""OpenAssistant message tables (oasst1 / oasst2) -> conversations, by rebuilding the message trees.

Each row is one message (`message_id`, `parent_id`, `role` prompter/assistant, `text`, `lang`, `deleted`,
`review_result`, `rank`). Deleted and failed-review messages are dropped with their whole subtree, other
languages too (`lang`, default "en"). A tree with a missing parent, a cycle, or a turn that does not alternate
(a prompter replying to a prompter) breaks only its branch: that branch is skipped and counted, every valid
path of the tree is kept. A tree with no valid path left (an assistant root, no message reaching a root) is
counted as a broken tree. Neither ever stops a run.

From each tree: by default the best-ranked path (at every step the child with the lowest `rank`; unranked
children come after ranked ones, ties go to the earlier message), optionally every root-to-leaf path. A path
always ends with an assistant message. Knows nothing about files or tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from gpt2chat.data.formats import FormatOptions, RowError, check_text, parsed_rows
from gpt2chat.data.rows import RawRow, Where
from gpt2chat.data.types import Conversation, LoadReport

ROLE = {"prompter": "user", "assistant": "assistant"}


@dataclass
class _Message:
    message_id: str
    parent_id: str | None
    role: str  # "user" | "assistant"
    text: str
    rank: float
    created: str
    tree_id: str | None
    where: Where


def _optional(row: dict, name: str, kinds: tuple, kind_name: str):
    value = row.get(name)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise RowError("wrong type", name, f"expected {kind_name} or null, got {type(value).__name__}")
    return value


def _parse_message(row: dict, where: Where, options: FormatOptions) -> _Message | str:
    """A message, or the reason it is filtered out (deleted, failed review, language)."""
    message_id = check_text(row.get("message_id"), "message_id", 200)
    parent_id = _optional(row, "parent_id", (str,), "a string")
    role = row.get("role")
    if role is None:
        raise RowError("missing field", "role", "missing (or null)")
    if not isinstance(role, str):
        raise RowError("wrong type", "role", f"expected a string, got {type(role).__name__}")
    if role not in ROLE:
        raise RowError("unknown role", "role", f"unknown role {role[:40]!r} (expected prompter or assistant)")
    text = check_text(row.get("text"), "text", options.max_chars)
    deleted = _optional(row, "deleted", (bool,), "a boolean")
    review = _optional(row, "review_result", (bool,), "a boolean")
    rank = _optional(row, "rank", (int, float), "a number")
    lang = _optional(row, "lang", (str,), "a string")
    tree_id = _optional(row, "message_tree_id", (str,), "a string")
    created = _optional(row, "created_date", (str,), "a string")
    if deleted:
        return "oasst: deleted message"
    if review is False:
        return "oasst: failed review"
    if options.lang and lang is not None and lang != options.lang:
        return f"oasst: language not {options.lang}"
    return _Message(message_id, parent_id or None, ROLE[role], text,
                    float("inf") if rank is None else float(rank), created or "", tree_id, where)


def oasst_conversations(rows: Iterable[RawRow], report: LoadReport, options: FormatOptions,
                        strict: bool) -> list[Conversation]:
    messages: dict[str, _Message] = {}
    removed: dict[str, str | None] = {}  # message_id -> parent_id of filtered messages
    tree_ids: set[str] = set()  # every message_tree_id seen, filtered messages included
    for parsed, raw in parsed_rows(rows, lambda raw: _parse_message(raw.data, raw.where, options),
                                   report, strict):
        if isinstance(raw.data.get("message_tree_id"), str):
            tree_ids.add(raw.data["message_tree_id"])
        if isinstance(parsed, str):
            report.drop(parsed)
            removed[str(raw.data.get("message_id"))] = raw.data.get("parent_id")
            continue
        if parsed.message_id in messages or parsed.message_id in removed:
            report.problem("duplicate message_id", f"{raw.where}: field 'message_id': duplicate "
                           f"{parsed.message_id!r}", strict)
            continue
        messages[parsed.message_id] = parsed
    conversations, used_trees = _conversations_from_messages(messages, removed, report, options)
    report.info["trees"] = len(tree_ids) if tree_ids else len(used_trees)
    emptied = len(tree_ids - used_trees)
    if emptied:
        report.drop("oasst: tree with no message left after filters", emptied)
    return conversations


def _conversations_from_messages(messages: dict[str, _Message], removed: dict[str, str | None],
                                 report: LoadReport, options: FormatOptions) -> tuple[list[Conversation], set[str]]:
    """Conversations, and the tree ids that had messages left (kept, broken or without a reply)."""
    children: dict[str, list[_Message]] = defaultdict(list)
    for message in messages.values():
        if message.parent_id is not None:
            children[message.parent_id].append(message)
    for siblings in children.values():
        siblings.sort(key=lambda m: (m.rank, m.created, m.message_id))

    # Every message's top: follow parents until a root, a filtered message, a missing parent or a cycle.
    top_of: dict[str, tuple[str, str]] = {}  # message_id -> (kind, top id)
    for start in messages:
        path, node, result = [], start, None
        seen: set[str] = set()
        while result is None:
            if node in top_of:
                result = top_of[node]
            elif node in seen:
                result = ("cycle", node)
            else:
                seen.add(node)
                path.append(node)
                parent = messages[node].parent_id
                if parent is None:
                    result = ("root", node)
                elif parent in messages:
                    node = parent
                elif _under_removed(parent, removed):
                    result = ("removed", parent)
                else:
                    result = ("missing parent", parent)
        for node in path:
            top_of[node] = result

    # Messages that reach a root form its tree; the others (a missing parent, a cycle) are a broken branch of
    # the tree they name, or a broken tree when no message of that tree reaches a root.
    trees: dict[str, list[_Message]] = defaultdict(list)
    detached: dict[str, dict[str, str]] = defaultdict(dict)  # tree key -> {top id: reason}
    for message in messages.values():
        kind, top = top_of[message.message_id]
        if kind == "removed":
            report.drop("oasst: reply to a dropped message")
        elif kind != "root":
            detached[message.tree_id or top][top] = kind
        else:
            trees[top].append(message)
    rooted = {messages[root_id].tree_id or root_id for root_id in trees}
    for key, tops in detached.items():
        if key not in rooted:
            report.drop(f"oasst: broken tree ({next(iter(tops.values()))})")
        else:
            for reason in tops.values():
                report.drop(f"oasst: broken branch ({reason})")
    used_trees = set(detached) | rooted

    conversations = []
    for root_id in trees:
        root = messages[root_id]
        if root.role != "user":
            report.drop("oasst: broken tree (turns do not alternate)")
            continue
        # A reply with the role of its parent (a prompter answering a prompter) cuts off that branch only.
        valid_children, cut = _alternating(root, children)
        paths = _all_paths(root, valid_children) if options.all_paths else [_best_path(root, valid_children)]
        paths = [path for path in paths if path]
        if not paths:
            report.drop("oasst: broken tree (turns do not alternate)" if cut else "oasst: tree without an assistant reply")
            continue
        if cut:
            report.drop("oasst: broken branch (turns do not alternate)", cut)
        for path in paths:
            turns = [{"role": m.role, "content": m.text} for m in path]
            conversations.append(Conversation(messages=turns, source=path[-1].where.source))
    return conversations, used_trees


def _alternating(root: _Message, children: dict[str, list[_Message]]) -> tuple[dict[str, list[_Message]], int]:
    """The children lists of the tree under `root` without the replies whose role repeats their parent's
    (and so without everything under them), and how many branches were cut."""
    kept: dict[str, list[_Message]] = {}
    cut, stack = 0, [root]
    while stack:
        node = stack.pop()
        good = [child for child in children.get(node.message_id, ()) if child.role != node.role]
        cut += len(children.get(node.message_id, ())) - len(good)
        if good:
            kept[node.message_id] = good
            stack.extend(good)
    return kept, cut


def _under_removed(message_id: str, removed: dict[str, str | None]) -> bool:
    return message_id in removed


def _has_reply(message: _Message, children: dict[str, list[_Message]]) -> bool:
    return any(child.role == "assistant" for child in children.get(message.message_id, ()))


def _best_path(root: _Message, children: dict[str, list[_Message]]) -> list[_Message]:
    path, node = [root], root
    while True:
        candidates = children.get(node.message_id, [])
        if node.role == "assistant":  # a user follow-up is only worth taking if someone answered it
            candidates = [c for c in candidates if _has_reply(c, children)]
        if not candidates:
            break
        node = candidates[0]
        path.append(node)
    while path and path[-1].role != "assistant":
        path.pop()
    return path


def _all_paths(root: _Message, children: dict[str, list[_Message]]) -> list[list[_Message]]:
    paths, seen, stack = [], set(), [[root]]
    while stack:
        path = stack.pop()
        kids = children.get(path[-1].message_id, [])
        if kids:
            stack.extend(path + [kid] for kid in reversed(kids))
            continue
        while path and path[-1].role != "assistant":
            path = path[:-1]
        key = tuple(m.message_id for m in path)
        if path and key not in seen:
            seen.add(key)
            paths.append(path)
    return paths
