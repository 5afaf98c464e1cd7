"""Config: defaults < YAML (and what it extends) < key=value, and one-line errors for bad input."""

from __future__ import annotations

import os

import pytest
import yaml

from craft.config import Config, ConfigError, ModelConfig, config_from_dict, list_presets, load_config, save_config


def write(path, text):
    path.write_text(text)
    return path


def test_presets_exist_and_load():
    assert {"tiny", "small", "base"} <= set(list_presets())
    tiny, small, base = (load_config(name) for name in ("tiny", "small", "base"))
    assert (small.model.dim, small.model.n_layer, small.model.n_head, small.model.context_length) == (288, 6, 6, 256)
    assert base.model.dim == 768 and base.model.n_layer == 12
    assert tiny.model.dim < small.model.dim


def test_yaml_value_takes_effect_without_overrides(tmp_path):
    cfg = load_config(str(write(tmp_path / "c.yaml", "model:\n  n_layer: 3\ntrain:\n  lr: 5.0e-4\n  max_steps: 77\n")))
    assert cfg.model.n_layer == 3 and cfg.train.lr == 5e-4 and cfg.train.max_steps == 77
    assert cfg.model.dim == ModelConfig().dim  # untouched keys keep their defaults


def test_precedence_defaults_file_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  n_layer: 3\n  dim: 96\n")
    cfg = load_config(str(path), ["model.n_layer=5", "train.lr=1e-3", "tokenizer.kind=char"])
    assert cfg.model.n_layer == 5  # override beats file
    assert cfg.model.dim == 96  # file beats default
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # "1e-3" parsed as a float
    assert cfg.tokenizer.kind == "char"


def test_extends_merges_base_file(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  dim: 96\n  n_layer: 2\ntrain:\n  max_steps: 300\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nmodel:\n  n_layer: 4\n")
    cfg = load_config(str(child))
    assert (cfg.model.dim, cfg.model.n_layer, cfg.train.max_steps) == (96, 4, 300)
    preset_child = write(tmp_path / "p.yaml", "extends: small\ntrain:\n  max_steps: 10\n  warmup_steps: 2\n")
    assert load_config(str(preset_child)).model.dim == 288


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_configs_nested_or_chained_past_reason_are_one_line(tmp_path):
    """A 2 KB file nested 1,000 deep, and a chain of 20 'extends', were RecursionError tracebacks."""
    write(tmp_path / "deep.yaml", "model: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(tmp_path / "deep.yaml"))
    for i in range(20):
        write(tmp_path / f"e{i}.yaml", f"extends: e{i + 1}.yaml\n")
    write(tmp_path / "e20.yaml", "train:\n  max_steps: 2\n")
    with pytest.raises(ConfigError, match="chains more than 16 files"):
        load_config(str(tmp_path / "e0.yaml"))


def test_a_sample_prompt_that_is_not_unicode_is_refused_at_start(tmp_path):
    """YAML's \\uD800 escape made the sample after the whole training fail in sentencepiece."""
    write(tmp_path / "c.yaml", 'train:\n  sample_prompt: "\\uD800abc"\n')
    with pytest.raises(ConfigError, match="sample_prompt is not valid Unicode"):
        load_config(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.n_layers=4"], r"unknown config key 'model.n_layers'; did you mean 'model.n_layer'\?"),
        (["modle.dim=4"], r"unknown config key 'modle'; did you mean 'model'\?"),
        (["train.lr=fast"], r"'train.lr' expects float, got 'fast'; write e.g. train.lr=3e-4"),
        (["model.n_layer=2.5"], r"'model.n_layer' expects int"),
        (["model.tie_embeddings=maybe"], r"'model.tie_embeddings' expects bool"),
        (["model.dim=130"], r"model.dim=130 is not divisible by model.n_head=4; pick n_head among"),
        (["model.dim=100"], r"model.dim / model.n_head = 25 must be even for RoPE"),
        (["model.n_kv_head=3"], r"model.n_head=4 is not divisible by model.n_kv_head=3"),
        (["train.lr=-0.1"], r"train.lr=-0.1 is out of range; set a value in \[1e-09, 1e\+06\]"),
        (
            ["train.max_steps=10", "train.warmup_steps=20"],
            r"train.warmup_steps=20 must be below train.max_steps=10; set train.warmup_steps=1 or -1",
        ),
        (["train.seed=-1"], r"train.seed=-1 is out of range; set a value in \[0, 4294967295\]"),
        (["train.seed=1e20"], r"train.seed=100000000000000000000 is out of range"),
        (["train.threads=1e20"], r"train.threads=\d+ is out of range"),
        (["train.batch_size=1e20"], r"train.batch_size=\d+ is out of range"),
        (["model.vocab_size=1e20"], r"model.vocab_size=\d+ is out of range"),
        (["model.ffn_dim=1e20"], r"model.ffn_dim=\d+ is out of range"),
        (["model.dim=1e20"], r"model.dim=\d+ is out of range"),  # once hung building the divisor list
        (["model.n_layer=1e20"], r"model.n_layer=\d+ is out of range"),
        (
            ["train.early_stop_min_delta=-1"],
            r"train.early_stop_min_delta=-1.0 is out of range; set a value in \[0, 10\]",
        ),
        (["train.early_stop_min_delta=nan"], r"train.early_stop_min_delta=nan is out of range"),
        (["train.lr=inf"], r"train.lr=inf is out of range"),
        (["train.min_lr=0.01", "train.lr=0.001"], r"train.min_lr=0.01 must not exceed train.lr=0.001"),
        (
            ["train.lr_decay_steps=10", "train.warmup_steps=20"],
            r"train.lr_decay_steps=10 must be at least train.warmup_steps=20",
        ),
        (["tokenizer.kind=bytes"], r"tokenizer.kind must be 'sentencepiece' or 'char'"),
        (["model"], r"override 'model' is not key=value"),
        (["model=3"], r"'model' is a section"),
        (["out_dir="], r"out_dir is empty; name the run directory"),  # would fill the current directory
        (["out_dir= "], r"out_dir is empty"),
        (["out_dir=."], r"out_dir=. is the current or the root directory"),  # filled it with run files
        (["out_dir=/"], r"out_dir=/ is the current or the root directory"),
        (["train.learning_rate=1"], r"did you mean 'train.lr'\?"),  # was 'train.min_lr': nanoGPT's names
        (["model.block_size=64"], r"did you mean 'model.context_length'\?"),  # was 'model.vocab_size'
        (["model.n_embd=64"], r"did you mean 'model.dim'\?"),
        (["lr=1e-3"], r"did you mean 'train.lr'\?"),  # a key in the wrong section
        (["train.compile=1"], r"'train.compile' expects bool, got '1'"),  # as YAML refuses compile: 1
        (["model.head_size=3"], r"model.head_size=3 must be even for RoPE"),  # named dim and n_head
        (["model.dim=32", "model.n_head=3"], r"pick n_head among \[1, 2, 4, 8, 16\]$"),  # 32: a head width of 1
        (["out_dir=runs/a\0b"], r"out_dir holds a NUL character"),  # a traceback, and in an exported run's config too
        (["out_dir=runs/\ud800"], r"is not a valid file name \(a lone surrogate\)"),
        (["train.warmup_steps=-2"], r"set a value in \[0, 1000000000\], or -1 \(a tenth of max_steps"),
        (["train.lr_decay_steps=-2"], r"set a value in \[1, 1000000000\], or 0 \(max_steps\)$"),
        (["train.max_steps=99999999999999999999999999"], r"^train.max_steps=99999999999999999999999999 is out"),
        (
            ["model.arch=recurrent", "model.qkv_bias=true"],  # trained, and exported as a file "with q/k/v biases"
            r"^model.qkv_bias applies to model.arch=llama only \(a recurrent model has no attention\); drop it$",
        ),
        (["model.arch=recurrent", "model.rope_scaling_factor=8"], r"^model.rope_scaling_factor applies to model.arch"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config("tiny", overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dim", [100, 90, 3])
def test_a_recurrent_model_takes_any_width(dim):
    """No heads and no RoPE: the head checks (dim / n_head even, divisible) are a transformer's."""
    assert load_config("tiny", ["model.arch=recurrent", f"model.dim={dim}"]).model.dim == dim


def test_yaml_alias_bomb_is_one_short_line(tmp_path):
    """A few hundred bytes of YAML aliases can nest 10^9 strings (here 5,000, 70 KB as repr); the
    error must not print them all."""
    lines = ["train:", "  lr:", '    - &a ["xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx"]']
    for name, prev in zip("bcd", "abc"):
        lines.append(f"    - &{name} [{', '.join(['*' + prev] * 10)}]")
    path = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"'train.lr' expects float, got \[\[") as info:
        load_config(str(path))
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)


def test_an_integer_too_large_for_a_float_is_one_line(tmp_path):
    """YAML reads 401 digits as an int; float() of it raised OverflowError, a traceback from craft-train
    (train.lr) and from craft-export (a run's model.rope_theta)."""
    for key, section in (("lr", "train"), ("rope_theta", "model")):
        path = write(tmp_path / "big.yaml", f"{section}:\n  {key}: 1{'0' * 400}\n")
        with pytest.raises(ConfigError, match=f"'{section}.{key}' is 1000.*, too large for a number") as info:
            load_config(str(path))
        assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"'train.max_step'; did you mean 'train.max_steps'"):
        load_config(str(path))


def test_unknown_preset_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_config_symlink_that_leads_nowhere_is_named_as_such(tmp_path):
    """A looping or dangling link as --config was "no preset named 'loop'": it is a path that exists."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("missing.yaml")
    for path in (tmp_path / "loop", tmp_path / "dangling"):
        with pytest.raises(ConfigError, match="is a symlink that leads nowhere"):
            load_config(str(path))


def test_config_that_is_not_a_regular_file(tmp_path):
    """A pipe (or a device) as --config would block or never end: refused by what it is."""
    os.mkfifo(tmp_path / "c.yaml")
    for path in (tmp_path / "c.yaml", "/dev/zero"):
        with pytest.raises(ConfigError, match="is not a regular file; pass a YAML path or a preset"):
            load_config(str(path))


def test_a_directory_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """craft-train with no -c in a folder holding a run called "tiny" was refused ("config file tiny
    is not a regular file"): a bare name that is not a file there is the preset."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "small").write_text("model:\n  dim: 64\n")  # a file by that name still wins: it is a path
    monkeypatch.chdir(tmp_path)
    assert (
        load_config("tiny").model
        == load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")).model
    )
    assert load_config("small").model.dim == 64
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config("./tiny")  # a path, not a name


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  dim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml line \d+: not valid YAML"):
        load_config(str(path))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["model.n_layer=3", "model.vocab_size=300"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and isinstance(again, Config)


def test_every_numeric_field_is_bounded():
    """A value outside BOUNDS is one line; every int / float field has bounds, and both ends load."""
    import dataclasses
    import typing

    from craft.config import BOUNDS

    cfg = Config()
    numeric = [
        f"{name}.{f.name}"
        for name in ("model", "tokenizer", "data", "train")
        for f in dataclasses.fields(getattr(cfg, name))
        if typing.get_type_hints(type(getattr(cfg, name)))[f.name] in (int, float)
    ]
    assert sorted(numeric) == sorted(BOUNDS)
    for key in ("model.n_layer", "train.seed", "train.batch_size", "train.threads", "train.sample_top_k"):
        section, name = key.split(".")
        low, high = BOUNDS[key]
        for value in (low, high):
            assert getattr(getattr(load_config("tiny", [f"{key}={value}"]), section), name) == value
        with pytest.raises(ConfigError, match=f"{key}=.* is out of range"):
            load_config("tiny", [f"{key}={high + 1}"])


def test_warmup_default_follows_max_steps():
    """warmup_steps -1: a tenth of max_steps, at most 50 - so max_steps alone can be lowered."""
    assert load_config("tiny").train.warmup_steps == 50  # tiny's 600 steps: the 50 it always had
    short = load_config("tiny", ["train.max_steps=30"])
    assert (short.train.warmup_steps, short.train.lr_decay_steps) == (3, 30)
    assert load_config("tiny", ["train.max_steps=1"]).train.warmup_steps == 0
    assert load_config("tiny", ["train.max_steps=30", "train.warmup_steps=7"]).train.warmup_steps == 7  # explicit stays


def test_resumed_config_keeps_the_schedule_the_run_started_with(tmp_path):
    from craft.config import resumed_config

    cfg = load_config("tiny", ["train.max_steps=100", f"out_dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    longer = resumed_config(tmp_path, ["train.max_steps=300"])
    assert (longer.train.max_steps, longer.train.lr_decay_steps, longer.train.warmup_steps) == (300, 100, 10)
    stretched = resumed_config(tmp_path, ["train.max_steps=300", "train.lr_decay_steps=300"])
    assert stretched.train.lr_decay_steps == 300
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())  # a run written before lr_decay_steps existed
    del old["train"]["lr_decay_steps"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert resumed_config(tmp_path, ["train.max_steps=300"]).train.lr_decay_steps == 100
    with pytest.raises(ConfigError, match="cannot change model"):
        resumed_config(tmp_path, ["model.n_layer=7"])
    with pytest.raises(ConfigError, match="--resume writes the run it resumes .*; drop out_dir="):
        resumed_config(tmp_path, [f"out_dir={tmp_path / 'other'}"])  # was ignored: trained on in tmp_path
    assert resumed_config(tmp_path, [f"out_dir={tmp_path}/"]).out_dir == str(tmp_path)  # the same run: fine


def test_run_config_errors_name_the_file(tmp_path):
    from craft.config import read_run_config
    from craft.run_dir import RunDirError

    with pytest.raises(RunDirError, match="has no config.yaml"):
        read_run_config(tmp_path)
    write(tmp_path / "config.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="config.yaml is not valid YAML"):
        read_run_config(tmp_path)
    write(tmp_path / "config.yaml", "train:\n  seed: -1\n")
    with pytest.raises(ConfigError, match=r"config.yaml: train.seed=-1 is out of range"):
        read_run_config(tmp_path)


def test_presets_found_where_the_package_is(tmp_path):
    """configs/ beside runtime/: the repository root in a checkout, craft/configs in a wheel."""
    from craft import config

    assert config.CONFIGS_DIR.is_dir() and (config.CONFIGS_DIR / "devices").is_dir()
    from craft.runtime import estimate

    assert estimate.DEVICES_DIR == config.CONFIGS_DIR / "devices"


def test_derived_model_sizes():
    m = ModelConfig(dim=288, n_head=6, n_kv_head=0)
    assert m.kv_heads == 6 and m.head_dim == 48
    assert m.hidden_dim == 768  # 8/3 * 288 = 768, already a multiple of 32
    assert ModelConfig(dim=128).hidden_dim == 352  # 341.3 rounded up to a multiple of 32
    assert ModelConfig(dim=128, ffn_dim=500).hidden_dim == 500


def test_config_words_and_files_that_mean_nothing_are_refused(tmp_path):
    """--config "" (an empty $CFG) trained the default preset; a key given twice in a YAML mapping
    kept the last (a second 'model:' section dropped the first); 'on' / 'off' were booleans in YAML only."""
    with pytest.raises(ConfigError, match="--config is empty"):
        load_config("", [])
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  dim: 64\nmodel:\n  n_layer: 2\n")
    with pytest.raises(ConfigError, match="line 3: not valid YAML \\(key 'model' appears twice in one mapping\\)"):
        load_config(str(twice), [])
    assert load_config(None, ["train.compile=on"]).train.compile is True
    assert load_config(None, ["train.compile=Off"]).train.compile is False


def test_yaml_the_loader_stumbled_on_is_one_line_or_read_as_yaml_reads_it(tmp_path):
    """From a fuzzing audit: a 5,000-digit number (PyYAML's int() raises ValueError, not a YAMLError)
    and a list as a key ('? [a, b]') were tracebacks; a merge key ('<<: *base'), which safe_load
    reads, was 'could not determine a constructor'; 'train.lr: 0.1' in a file suggested 'train.lr'
    itself; a 200 MB config took minutes to parse."""
    digits = write(tmp_path / "digits.yaml", "train:\n  seed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="digits.yaml: a value is not a number a config can hold \\(Exceeds"):
        load_config(str(digits), [])
    listed = write(tmp_path / "listed.yaml", "? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="listed.yaml line 1: not valid YAML \\(a key is a list, not a name\\)"):
        load_config(str(listed), [])
    merged = write(
        tmp_path / "merged.yaml",
        "model: &base\n  dim: 64\n  n_layer: 2\ntrain:\n  lr: 0.01\nout_dir: runs/x\ntokenizer:\n  kind: char\n",
    )
    assert load_config(str(merged), []).model.dim == 64
    merged.write_text("base: &b {dim: 64, n_layer: 2}\n")  # an anchor needs a key of its own: that key is unknown
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(str(merged), [])
    merged.write_text("model:\n  <<: {dim: 64, n_layer: 3}\n  n_layer: 2\n")  # a merged key overridden in place
    assert (load_config(str(merged), []).model.dim, load_config(str(merged), []).model.n_layer) == (64, 2)
    dotted = write(tmp_path / "dotted.yaml", "train.lr: 0.1\n")
    with pytest.raises(ConfigError, match="a YAML file nests it: 'train:' and below it, indented, 'lr: ...'"):
        load_config(str(dotted), [])
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(ConfigError, match="huge.yaml is larger than 1,048,576 bytes"):
        load_config(str(huge), [])


def test_override_values_are_read_as_yaml_reads_them():
    """A word's surrounding spaces are dropped as YAML drops them ('tokenizer.kind= char' was refused
    as ' char'); a text's are kept."""
    cfg = load_config(
        "tiny", ["tokenizer.kind= char ", "train.max_steps= 300", "train.max_steps=1_000", "train.sample_prompt= The"]
    )
    assert cfg.tokenizer.kind == "char" and cfg.train.max_steps == 1000
    assert cfg.train.sample_prompt == " The"  # a text keeps its spaces: ' The' is another BPE token than 'The'
