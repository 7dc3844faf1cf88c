"""Recipe files and flags: unknown keys (with a suggestion), impossible values, types, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2chat.cli import main
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.train.config import ConfigError, build_config, read_recipe, recipe_stages

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_unknown_top_level_key_names_it_and_suggests(tmp_path):
    path = write(tmp_path, 'model = "gpt2"\nbatchsize = 4\n')
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize'.*did you mean 'batch_size'"):
        read_recipe(path)


def test_unknown_key_in_a_stage_table(tmp_path):
    path = write(tmp_path, '[sft]\nwarmup_ration = 0.1\n')
    with pytest.raises(ConfigError, match=r"\[sft\] unknown key 'warmup_ration'.*'warmup_ratio'"):
        read_recipe(path)


@pytest.mark.parametrize("key, value", [("beta", 0.0), ("beta", -1.0), ("lr", 0.0), ("lr", -1e-4),
                                        ("batch_size", 0), ("grad_accum", 0), ("max_length", 0),
                                        ("warmup_ratio", 1.5), ("max_grad_norm", -1.0)])
def test_impossible_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        build_config("dpo", {"data": ["x:y"]}, {key: value})


@pytest.mark.parametrize("key, value, expected", [("lr", "fast", "number"), ("batch_size", 2.5, "integer"),
                                                  ("pack", "yes", "true or false"), ("data", 3, "list")])
def test_wrong_types_name_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=f"{key}.*{expected}"):
        build_config("sft", {"data": ["x:y"]}, {key: value})


def test_schedule_and_budget_checks():
    with pytest.raises(ConfigError, match="schedule.*constant, cosine"):
        build_config("sft", {"data": ["x:y"]}, {"schedule": "exponential"})
    with pytest.raises(ConfigError, match="max_prompt_length.*< max_length"):
        build_config("dpo", {"data": ["x:y"]}, {"max_prompt_length": 200, "max_length": 160})
    with pytest.raises(ConfigError, match="no dataset"):
        build_config("sft", {}, {})


def test_flags_override_the_stage_table_which_overrides_shared_keys(tmp_path):
    path = write(tmp_path, 'lr = 1e-3\nseed = 5\ndata = ["a:b"]\n[sft]\nlr = 2e-3\n[orpo]\nbeta = 0.2\n')
    recipe = read_recipe(path)
    assert recipe_stages(recipe) == ["sft", "orpo"]
    sft = build_config("sft", recipe, {"seed": None})
    assert (sft.lr, sft.seed) == (2e-3, 5)
    orpo = build_config("orpo", recipe, {"lr": 3e-3})
    assert (orpo.lr, orpo.beta) == (3e-3, 0.2)


def test_every_config_field_is_a_flag_of_the_training_commands():
    """The flags come from the TrainConfig fields: each one (but the objective) parses into the config."""
    import dataclasses

    from gpt2chat.cli import build_parser
    from gpt2chat.cli.train import _overrides
    from gpt2chat.train.config import TrainConfig

    samples = {"int": "3", "float": "0.5", "str": "x"}
    parser = build_parser()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "objective":
            continue
        assert f.metadata["help"], f.name
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split(" | ")[0]
        argv = [flag] if kind == "bool" else [flag, "a", "b"] if f.name == "lora_targets" else [flag, samples.get(kind, "v")]
        args = parser.parse_args(["dpo", *argv])
        expected = {"bool": True, "int": 3, "float": 0.5}.get(kind, ["a", "b"] if f.name == "lora_targets" else
                                                          ["v"] if f.name == "data" else samples.get(kind, "v"))
        assert _overrides(args)[f.name] == expected, f.name
    args = parser.parse_args(["sft", "--no-pack", "--resume"])
    assert (_overrides(args)["pack"], _overrides(args)["resume"], _overrides(args)["lr"]) == (False, "last", None)


def test_objective_mismatch_and_both_preference_stages(tmp_path):
    with pytest.raises(ConfigError, match="objective = 'dpo' but the command is 'sft'"):
        build_config("sft", read_recipe(write(tmp_path, 'objective = "dpo"\ndata = ["a:b"]\n')))
    with pytest.raises(ConfigError, match="either \\[dpo\\] or \\[orpo\\]"):
        recipe_stages(read_recipe(write(tmp_path, '[sft]\n[dpo]\n[orpo]\n')))


def test_fingerprint_ignores_bookkeeping_but_not_training_keys():
    base = build_config("sft", {"data": ["a:b"]})
    assert base.fingerprint() == build_config("sft", {"data": ["a:b"]}, {"save_every": 7, "out": "x"}).fingerprint()
    assert base.fingerprint() != build_config("sft", {"data": ["a:b"]}, {"lr": 1e-3}).fingerprint()


@pytest.mark.parametrize("name", ["quickstart", "gpt2chat", "dpo-ultrafeedback", "lora-sft-oasst1", "neo-lora-guanaco"])
def test_shipped_recipes_are_valid(name):
    recipe = read_recipe(CONFIGS / f"{name}.toml")
    for stage in recipe_stages(recipe):
        cfg = build_config(stage, recipe)
        assert cfg.data and cfg.out


def test_dpo_ultrafeedback_recipe_has_seed_002s_hyperparameters():
    cfg = build_config("dpo", read_recipe(CONFIGS / "dpo-ultrafeedback.toml"))
    assert (cfg.beta, cfg.max_prompt_length, cfg.max_response_length, cfg.max_length) == (0.1, 96, 64, 160)
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.max_grad_norm, cfg.epochs, cfg.seed) == (
        4, 4, 1e-5, 1.0, 1.0, 13)
    assert cfg.template == "plain" and cfg.precompute_ref


def test_neo_lora_guanaco_recipe_has_seed_004s_hyperparameters():
    cfg = build_config("sft", read_recipe(CONFIGS / "neo-lora-guanaco.toml"))
    assert (cfg.lr, cfg.max_steps, cfg.warmup_ratio, cfg.schedule, cfg.max_length) == (2e-4, 500, 0.03, "constant", 512)
    assert (cfg.batch_size, cfg.grad_accum) == (4, 4) and cfg.lora_r > 0


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    code = main(["sft", "--data", "sample", "--batch-size", "0", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: batch_size = 0") and "Traceback" not in err
    code = main(["dpo", "--config", str(write(tmp_path, "[dpo]\nbeta = -0.1\ndata = ['a:b']\n"))])
    assert code == 2 and "beta" in capsys.readouterr().err


def test_set_reaches_any_key_and_unknown_set_keys_fail(capsys):
    code = main(["sft", "--data", "sample", "--set", "warmup_ratoi=0.1"])
    assert code == 2
    assert "unknown option 'warmup_ratoi' (did you mean 'warmup_ratio'?)" in capsys.readouterr().err


@pytest.mark.parametrize("typed, ours", [("learning_rate", "lr"), ("gradient_accumulation_steps", "grad_accum"),
                                         ("per_device_train_batch_size", "batch_size"), ("num_train_epochs", "epochs"),
                                         ("max_seq_length", "max_length"), ("output_dir", "out")])
def test_a_transformers_or_trl_name_points_to_ours(typed, ours, tmp_path, capsys):
    assert main(["sft", "--data", "sample", "--set", f"{typed}=1"]) == 2
    assert f"unknown option {typed!r} (did you mean {ours!r}?)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=rf"\[dpo\] unknown key '{typed}' \(did you mean '{ours}'\?\)"):
        read_recipe(write(tmp_path, f"[dpo]\n{typed} = 1\n"))


def test_pipeline_rejects_unknown_eval_keys_before_training(tmp_path, capsys):
    path = write(tmp_path, 'model = "init:tiny"\n[sft]\ndata = ["sample"]\n[eval]\nmax_row = 3\n')
    code = main(["pipeline", "--config", str(path), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "[eval] unknown key 'max_row'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_errors_are_gpt2chat_errors():
    assert issubclass(ConfigError, Gpt2ChatError)


def test_auto_distribution_shards_only_full_fine_tuning_of_large_models():
    from gpt2chat.train.distributed import FSDP_AUTO_PARAMS, DistState, settle_auto

    def mode(requested: str, n_params: int, lora: bool = False, start: str = "ddp") -> str:
        state = DistState(world_size=2, mode=start)
        settle_auto(state, requested, n_params, lora)
        return state.mode

    large, small = 774_030_080, 124_439_808          # gpt2-large, gpt2
    assert large >= FSDP_AUTO_PARAMS > small
    assert mode("auto", large) == "fsdp"
    assert mode("auto", small) == "ddp"
    assert mode("auto", large, lora=True) == "ddp"
    assert mode("ddp", large) == "ddp"                # an explicit choice stands
    assert mode("auto", large, start="none") == "none"  # a single process is never wrapped
