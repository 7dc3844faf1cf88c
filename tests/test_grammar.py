"""grammar.py + sampling's masks: constrained replies from a tiny random model always parse and validate,
rows with and without constraints share a step untouched, logit_bias, bad schemas are named."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2chat.engine import BatchedEngine, Engine
from gpt2chat.grammar import Constraint, GrammarError
from gpt2chat.sampling import SamplingParams, sample_next

jsonschema = pytest.importorskip("jsonschema")

# bounded strings, arrays and numbers: a random model ends only what the grammar makes it end
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": ["string", "null"],
                                                                            "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    from gpt2chat.checkpoint import load_model
    from gpt2chat.tokenizer import Tokenizer

    model, _ = load_model(tiny_checkpoint, device="cpu")
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    return model, tokenizer, model.config.vocab_size


def stops(tokenizer):
    return (tokenizer.token_to_id("<|eot_id|>"), tokenizer.eos_token_id)


def test_hundred_constrained_replies_parse_and_validate(setup):
    model, tokenizer, width = setup
    constraint = Constraint.json_schema(SCHEMA, tokenizer, width)
    engine = Engine(model, max_batch_size=8)
    prompts = [tokenizer.encode(f"Person number {i}:") for i in range(100)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=120, seed=i, stop_token_ids=stops(tokenizer),
                             constraint=constraint) for i in range(100)]
    results = []
    for start in range(0, 100, 20):
        for prompt, p in zip(prompts[start:start + 20], params[start:start + 20], strict=True):
            results.append(engine.generate([prompt], p)[0])
    finished = [r.finish_reason for r in results]
    assert finished == ["stop"] * 100
    texts = [tokenizer.decode(r.token_ids) for r in results]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 50  # the seeds give different replies: the model samples inside the grammar
    assert all(": " in t and t == json.dumps(json.loads(t), ensure_ascii=False) for t in texts)  # json.dumps layout


def test_constrained_and_free_rows_share_a_batch(setup):
    """An unconstrained row gives the same tokens whether or not a constrained row shares its steps."""
    model, tokenizer, width = setup
    constraint = Constraint.json_schema(SCHEMA, tokenizer, width)
    free = SamplingParams(temperature=0.8, max_new_tokens=30, seed=7)
    bound = SamplingParams(temperature=0.8, max_new_tokens=150, seed=3, stop_token_ids=stops(tokenizer),
                           constraint=constraint)
    prompt = tokenizer.encode("Hello there")
    engine = Engine(model, max_batch_size=4)
    alone = engine.generate([prompt], free)[0].token_ids
    with BatchedEngine(model, max_batch_size=4) as batched:
        requests = [batched.submit(prompt, free), batched.submit(prompt, bound), batched.submit(prompt, free)]
        for r in requests:
            r.wait()
    assert requests[0].token_ids == alone == requests[2].token_ids
    jsonschema.validate(json.loads(tokenizer.decode(requests[1].token_ids)), SCHEMA)
    assert requests[1].finish_reason == "stop"


def test_cut_by_max_tokens_says_length(setup):
    model, tokenizer, width = setup
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=1, stop_token_ids=stops(tokenizer),
                            constraint=Constraint.json_object(tokenizer, width))
    result = Engine(model).generate([tokenizer.encode("x")], params)[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert tokenizer.decode(result.token_ids).startswith("{")


def test_stop_tokens_only_when_the_grammar_is_complete():
    from gpt2chat.tokenizer import Tokenizer

    tokenizer = Tokenizer.gpt2()
    width = len(tokenizer)
    constraint = Constraint.json_schema({"enum": ["yes", "no"]}, tokenizer, width)
    state = constraint.start()
    eos = tokenizer.eos_token_id
    # logits that love the stop token: it is still refused until the value is complete
    logits = torch.zeros(1, width)
    logits[0, eos] = 50.0
    params = SamplingParams(temperature=0, stop_token_ids=(eos,))
    out = []
    for _ in range(5):
        token = int(sample_next(logits, None, params, constraints=[state]))
        if token == eos:
            break
        out.append(token)
    assert tokenizer.decode(out) in ('"yes"', '"no"') and token == eos


def test_logit_bias_forces_and_bans_per_row():
    logits = torch.zeros(3, 10)
    logits[:, 4] = 5.0
    rows = [SamplingParams(temperature=0, logit_bias={7: 100}),
            SamplingParams(temperature=0),
            SamplingParams(temperature=0, logit_bias={4: -100, 2: 1})]
    assert sample_next(logits, None, rows).tolist() == [7, 4, 2]
    # sampled rows too: a banned token is never drawn
    sampled = SamplingParams(temperature=1.0, seed=0, logit_bias={4: -100})
    drawn = {int(sample_next(logits[:1], None, sampled, [k])) for k in range(200)}
    assert 4 not in drawn and len(drawn) > 3


@pytest.mark.parametrize("bias", [{1: 101}, {-1: 3}, {"x": 1}, [(1,)]])
def test_bad_logit_bias_is_named(bias):
    with pytest.raises(Exception, match="logit_bias"):
        SamplingParams(logit_bias=bias)


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "strin"}, "strin"),
    ({"$ref": "#/$defs/Missing"}, "Missing"),
    ({"type": "string", "pattern": "([a-z"}, "regex"),
    ({"type": "integer", "not": {"const": 3}}, "not"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ("{", "object"),
])
def test_schema_the_engine_cannot_compile_is_named(schema, words):
    from gpt2chat.tokenizer import Tokenizer

    tokenizer = Tokenizer.gpt2()
    with pytest.raises(GrammarError, match=words):
        Constraint.json_schema(schema, tokenizer, len(tokenizer))


def test_masks_never_allow_control_or_padding_ids(setup):
    _, tokenizer, width = setup
    from gpt2chat.grammar import grammar_masks

    state = Constraint.json_schema({"type": "string"}, tokenizer, width).start()
    state.advance(tokenizer.encode('"')[0])
    allowed = grammar_masks([state], [stops(tokenizer)], width, "cpu")[0]
    assert allowed.sum() > 40000  # inside a string nearly every text token fits
    banned = sorted(tokenizer.special_token_ids) + list(range(len(tokenizer), width))
    assert not allowed[banned].any()


def test_cli_generate_json_schema_prints_json_that_validates(tiny_checkpoint, tmp_path, capsys):
    from gpt2chat.cli import main

    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    for seed in ("1", "2"):
        assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Person:", "--json-schema", str(path),
                     "--max-new-tokens", "200", "--temperature", "1", "--seed", seed]) == 0
        jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    # cut by --max-new-tokens: the unfinished JSON is shown, but the command says why it does not parse, exit 1
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Person:", "--json-schema", str(path),
                 "--max-new-tokens", "3", "--temperature", "1", "--seed", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("{") and "reached --max-new-tokens (3) before the JSON was complete" in err


@pytest.mark.parametrize("text, words", [("{oops", "not valid JSON"), ('{"type": "object", "not": {}}', "not")])
def test_cli_bad_json_schema_file_is_one_message(tiny_checkpoint, tmp_path, capsys, text, words):
    from gpt2chat.cli import main

    path = tmp_path / "schema.json"
    path.write_text(text)
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--json-schema", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --json-schema {path}") and words in err and "Traceback" not in err
