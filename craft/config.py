"""Typed configuration: dataclass defaults < YAML file (and what it extends) < key=value overrides.

Every field has a default with a comment saying why. A YAML file or a command-line override
only changes fields that exist; an unknown key, a value of the wrong type or an impossible
combination raises ConfigError with one line naming the key and the fix.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# configs/ sits beside runtime/: in a source checkout (or editable install) at the repository
# root, in an installed wheel inside the craft package (setup.py ships it as package data).
_HERE = Path(__file__).resolve().parent
CONFIGS_DIR = _HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"
DEFAULT_PRESET = "tiny"
ARCHS = ("llama", "recurrent")  # model.arch: craft.model.Transformer, craft.recurrent.Recurrent
# Imported-model attention settings a recurrent config refuses unless left at their defaults (n_head,
# n_kv_head and rope_theta are ignored instead: the presets a recurrent config extends set them)
ATTENTION_ONLY = (
    "head_size",
    "qkv_bias",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_context",
)


class ConfigError(ValueError):
    """A user error in a config file or override; the message is one line that names the fix."""


@dataclass
class ModelConfig:
    # "llama" (attention + KV-cache) or "recurrent" (gated recurrence, fixed-size state; craft/recurrent.py)
    arch: str = "llama"
    vocab_size: int = 0  # 0: taken from the tokenizer once it is built (the usual case)
    dim: int = 128  # residual width; head_dim = dim / n_head unless head_size says otherwise
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 means n_head (plain MHA)
    ffn_dim: int = 0  # SwiGLU hidden width; 0 means 8/3 * dim rounded up to a multiple of 32 (Llama)
    context_length: int = 128  # longest sequence trained on and the runtime's hard limit
    rope_theta: float = 10000.0  # RoPE base frequency, Llama's value
    norm_eps: float = 1e-5  # RMSNorm epsilon, Llama's value
    tie_embeddings: bool = True  # LM head shares the embedding matrix: fewer bytes on the device
    dropout: float = 0.0  # small models on small corpora rarely need it; nanoGPT's CPU recipe uses 0
    # Imported models (craft.export.sources) need these; Craft's own presets keep the defaults.
    head_size: int = 0  # per-head width when a checkpoint says so (Mistral/Llama head_dim); 0 means dim / n_head
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2); Llama keeps none
    rope_scaling_factor: float = 0.0  # Llama-3 "llama3" rope_scaling: wavelengths stretched by this; 0 means none
    rope_low_freq_factor: float = (
        1.0  # Llama-3 scaling: wavelengths above original_context / this are divided by factor
    )
    rope_high_freq_factor: float = 4.0  # Llama-3 scaling: wavelengths below original_context / this stay as they are
    rope_original_context: int = 8192  # Llama-3 scaling: the context the model was pretrained with

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return 32 * math.ceil(8 * self.dim / 3 / 32)


@dataclass
class TokenizerConfig:
    kind: str = "sentencepiece"  # "sentencepiece" (subwords) or "char" (one token per character)
    model_type: str = "bpe"  # sentencepiece algorithm: "bpe" or "unigram"
    vocab_size: int = 1024  # sentencepiece vocabulary; small corpora overfit larger ones (char ignores it)


@dataclass
class DataConfig:
    path: str = ""  # a .txt file or a directory of .txt files; "" is the bundled Python docs corpus
    val_fraction: float = 0.1  # share of the corpus held out (the tail of each document) for eval


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    max_steps: int = 600  # optimizer steps of the run; --resume may raise it to train further
    lr: float = 3e-3  # peak learning rate; small models tolerate a high one
    min_lr: float = 3e-4  # floor of the cosine decay (lr / 10, Chinchilla's habit)
    # Linear warmup from 0 to lr. -1: a tenth of max_steps, at most 50 (tiny's 50 of 600), so that
    # a short run (train.max_steps=30) needs no second override; the resolved number is saved.
    warmup_steps: int = -1
    # The cosine decay from lr reaches min_lr here, then lr stays at min_lr. 0: max_steps at the
    # start of the run. Saved resolved in config.yaml, so a run resumed with a larger max_steps
    # continues the same schedule (no jump in lr): its extra steps train at min_lr.
    lr_decay_steps: int = 0
    weight_decay: float = 0.1  # AdamW decay on matrices only (not norms)
    beta1: float = 0.9  # AdamW betas as in nanoGPT / Llama
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast); see README for measured speed
    compile: bool = False  # torch.compile the model; off because compile time dominates short runs
    seed: int = 1337  # seeds data sampling, init and dropout: same seed, same run (0 to 2**32 - 1)
    threads: int = 0  # torch intra-op threads, capped at the usable CPUs; 0 lets torch choose (all cores)
    log_interval: int = 10  # steps between progress-bar / metrics.jsonl updates
    eval_interval: int = 100  # steps between val-loss evaluations (and at the end)
    eval_iters: int = 20  # batches averaged per evaluation
    checkpoint_interval: int = 200  # steps between checkpoints (and at the end)
    keep_last: int = 2  # periodic checkpoints kept (older ones pruned); best.pt is kept apart
    early_stop_patience: int = 0  # evals without val improvement before stopping; 0 disables
    early_stop_min_delta: float = 0.0  # improvement smaller than this does not reset patience
    sample_interval: int = 0  # steps between text samples into samples.txt; 0: only at the end
    sample_prompt: str = ""  # prompt for those samples ("" starts from BOS)
    sample_tokens: int = 128  # tokens per sample
    sample_temperature: float = 0.8  # sampling temperature for samples
    sample_top_k: int = 40  # top-k for samples


@dataclass
class Config:
    out_dir: str = "runs/tiny"  # the run directory: config, tokenizer, checkpoints, metrics
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading -------------------------------------------------------------------------------


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name ("tiny") or a path to a YAML file."""
    path = Path(name_or_path)
    preset = CONFIGS_DIR / f"{name_or_path}.yaml"
    if path.suffix in (".yaml", ".yml") or os.path.lexists(path):  # lexists: a dangling or looping link is a path
        if not path.is_file() and path.suffix == "" and os.sep not in name_or_path and preset.is_file():
            return preset  # a directory that happens to be called "tiny" (a run's out_dir) is no config file
        if not path.is_file():
            if path.exists():
                what = "is not a regular file"
            elif path.is_symlink():
                what = "is a symlink that leads nowhere (dangling, or a loop)"
            else:
                what = "does not exist"
            raise ConfigError(f"config file {path} {what}; pass a YAML path or a preset: {', '.join(list_presets())}")
        return path
    if not preset.is_file():
        hint = difflib.get_close_matches(name_or_path, list_presets(), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"presets are: {', '.join(list_presets())}"
        raise ConfigError(f"no preset named '{name_or_path}'; {fix}")
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


MIN_SENTENCEPIECE_VOCAB = 300  # 256 byte-fallback pieces, the specials and some merges
MAX_EXTENDS = 16  # files an 'extends:' chain may pass through; the presets use one


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping in `path`, merged over the file named by its `extends:` key (if any)."""
    import yaml

    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {', '.join(str(p) for p in _seen)}")
    if len(_seen) >= MAX_EXTENDS:
        raise ConfigError(f"{path}: 'extends' chains more than {MAX_EXTENDS} files; flatten the configs")
    try:
        data = yaml.load(read_text(path), Loader=_unique_key_loader()) or {}
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a config; pass a flat mapping of keys") from None
    except ValueError as e:  # PyYAML's int() of a number past Python's 4,300 digits: not a YAMLError
        raise ConfigError(f"{path}: a value is not a number a config can hold ({str(e).split(';')[0]})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    beside = path.parent / str(base)  # a file next to this one, else a preset name or path
    base_path = beside if beside.is_file() else resolve_config_path(str(base))
    return deep_merge(read_yaml(base_path, _seen + (path,)), data)


def _unique_key_loader():
    """yaml.SafeLoader refusing a key given twice in one mapping (safe_load keeps the last: a second
    'model:' section silently dropped the first). A merge key ('<<: *anchor') is YAML's own override,
    not a repeat: the mapping's keys are checked as written, then merged as safe_load merges them."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(node, yaml.MappingNode) and key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, collections.abc.Hashable):  # '? [a, b]': safe_load refuses it too
                    raise yaml.constructor.ConstructorError(
                        None, None, f"a key is a {type(key).__name__}, not a name", key_node.start_mark
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


MAX_CONFIG_BYTES = 1 << 20  # the presets are under 2 KB; a 200 MB file took minutes to parse


def read_text(path: Path) -> str:
    """A config file's text; ConfigError (not a traceback) if it cannot be read, is larger than
    MAX_CONFIG_BYTES or is not UTF-8 text."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes, more than any config; pass a config")
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a UTF-8 text file (byte {e.start}); pass a YAML config") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}; check the path and its permissions") from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["model.n_layer=4", "train.lr=1e-3"] -> {"model": {"n_layer": "4"}, "train": {"lr": "1e-3"}}.

    Values stay strings here; apply_dict converts them to each field's type.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value; write e.g. train.max_steps=200")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one for '{part}'")
        node[leaf] = value  # as given: a text such as train.sample_prompt=' The' keeps its spaces
    return out


def apply_dict(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set dataclass fields of `obj` from a nested mapping, converting and checking types."""
    if not isinstance(values, dict):  # a checkpoint's saved config section that is a list: AttributeError
        what = f"'{prefix.rstrip('.')}'" if prefix else "the config"
        raise ConfigError(f"{what} is a {type(values).__name__}, expected a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = [f"{prefix}{name}" for name in fields]
            hint = suggest(dotted)
            fix = f"did you mean '{hint}'?" if hint else f"valid keys here: {', '.join(known)}"
            if hint == dotted:  # 'train.lr: 0.1' in a YAML file: a dotted key is key=value's form only
                section, leaf = hint.split(".", 1)
                fix = f"a YAML file nests it: '{section}:' and below it, indented, '{leaf}: ...'"
            raise ConfigError(f"unknown config key '{dotted}'; {fix}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"'{dotted}' is a section; set its keys, e.g. {dotted}.{dataclasses.fields(current)[0].name}=..."
                )
            apply_dict(current, value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, convert(value, hints[key], dotted))


# Names other trainers use for Craft's keys (nanoGPT, Hugging Face configs).
KEY_ALIASES = {
    "learning_rate": "train.lr",
    "block_size": "model.context_length",
    "max_position_embeddings": "model.context_length",
    "n_embd": "model.dim",
    "hidden_size": "model.dim",
    "num_hidden_layers": "model.n_layer",
    "num_attention_heads": "model.n_head",
    "intermediate_size": "model.ffn_dim",
    "max_iters": "train.max_steps",
}


def suggest(dotted: str) -> str | None:
    """The config key meant by an unknown `dotted` one: a known alias of its last part, else the
    closest key in any section (a misplaced 'lr' is 'train.lr'), else None."""
    keys = [f.name for f in dataclasses.fields(Config)]  # the sections too: 'modle' is 'model'
    for f in dataclasses.fields(Config):
        if f.default_factory is not dataclasses.MISSING:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory())]
    leaf = dotted.rsplit(".", 1)[-1]
    if leaf in KEY_ALIASES:
        return KEY_ALIASES[leaf]
    exact = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if exact:
        return exact[0]
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.75) or difflib.get_close_matches(
        leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.75
    )
    return next((k for k in keys if close and (k == close[0] or k.endswith("." + close[0]))), None)


BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def convert(value: Any, kind: type, key: str) -> Any:
    """`value` as type `kind` (bool, int, float or str), or a ConfigError naming `key`."""
    text = value.strip() if isinstance(value, str) else value
    if kind is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in BOOLEAN_WORDS:  # the words YAML reads as booleans
            return BOOLEAN_WORDS[text.lower()]
    elif kind is int:
        if isinstance(text, int) and not isinstance(text, bool):
            return text
        if isinstance(text, float) and text.is_integer():
            return int(text)
        if isinstance(text, str):
            try:
                return int(text)  # exact: through float, 10**26 came back as 100000000000000004764729344
            except ValueError:
                pass
            try:
                number = float(text.replace("_", ""))  # 1e3, 2_000.0
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
    elif kind is float:
        try:
            if isinstance(text, (int, float)) and not isinstance(text, bool):
                return float(text)
            if isinstance(text, str):
                return float(text)
        except ValueError:
            pass
        except OverflowError:  # an integer of 400 digits: float() raised, a traceback
            raise ConfigError(f"'{key}' is {shown(value)}, too large for a number; write e.g. {key}=3e-4") from None
    elif kind is str:
        if isinstance(text, str):
            return value
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return str(text)
    example = {bool: "true", int: "4", float: "3e-4", str: "text"}[kind]
    raise ConfigError(f"'{key}' expects {kind.__name__}, got {shown(value)}; write e.g. {key}={example}")


def shown(value: Any) -> str:
    """repr() cut short: a YAML alias bomb (a few hundred bytes that nest 10^9 strings) or a long
    string must not become the error message."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 3, 3, 60, 60
    return short.repr(value)


# Inclusive bounds of every int and float field. Outside them a value is a typo (-1, 1e20) that
# would crash torch or numpy, allocate without end or hang; inside them the checks below decide.
BOUNDS: dict[str, tuple[float, float]] = {
    "model.vocab_size": (0, 1 << 20),
    "model.dim": (1, 16384),
    "model.n_layer": (1, 256),
    "model.n_head": (1, 1024),
    "model.n_kv_head": (0, 1024),
    "model.ffn_dim": (0, 131072),
    "model.context_length": (1, 131072),
    "model.rope_theta": (1.0, 1e9),
    "model.norm_eps": (1e-12, 0.1),
    "model.dropout": (0.0, 0.99),
    "model.head_size": (0, 4096),
    "model.rope_scaling_factor": (0.0, 1e4),
    "model.rope_low_freq_factor": (1e-6, 1e4),
    "model.rope_high_freq_factor": (1e-6, 1e4),
    "model.rope_original_context": (1, 1 << 24),
    "tokenizer.vocab_size": (1, 1 << 20),
    "data.val_fraction": (1e-4, 0.49),
    "train.batch_size": (1, 65536),
    "train.grad_accum": (1, 65536),
    "train.max_steps": (1, 10**9),
    "train.lr": (1e-9, 1e6),
    "train.min_lr": (0.0, 1e6),
    "train.warmup_steps": (0, 10**9),
    "train.lr_decay_steps": (1, 10**9),
    "train.weight_decay": (0.0, 10.0),
    "train.beta1": (0.0, 0.9999),
    "train.beta2": (0.0, 0.9999),
    "train.grad_clip": (0.0, 1e6),
    "train.seed": (0, 2**32 - 1),
    "train.threads": (0, 4096),
    "train.log_interval": (1, 10**9),
    "train.eval_interval": (1, 10**9),
    "train.eval_iters": (1, 10**6),
    "train.checkpoint_interval": (1, 10**9),
    "train.keep_last": (1, 1000),
    "train.early_stop_patience": (0, 10**6),
    "train.early_stop_min_delta": (0.0, 10.0),
    "train.sample_interval": (0, 10**9),
    "train.sample_tokens": (0, 65536),
    "train.sample_temperature": (0.0, 100.0),
    "train.sample_top_k": (0, 1 << 20),
}


# Values outside BOUNDS that resolve() turns into a derived one, named in the out-of-range message.
DERIVED = {"train.warmup_steps": "-1 (a tenth of max_steps, at most 50)", "train.lr_decay_steps": "0 (max_steps)"}


def resolve(cfg: Config) -> None:
    """Fill the values that follow from others (-1 / 0: derived); a resolved value stays as it is."""
    t = cfg.train
    # words, read as YAML reads them: 'tokenizer.kind= char' is 'char' (texts such as sample_prompt keep spaces)
    cfg.tokenizer.kind, cfg.model.arch = cfg.tokenizer.kind.strip(), cfg.model.arch.strip()
    if t.warmup_steps == -1:
        t.warmup_steps = max(0, min(50, t.max_steps // 10))
    if t.lr_decay_steps == 0:
        t.lr_decay_steps = t.max_steps


def validate(cfg: Config) -> None:
    """Reject impossible values with one line naming the key and the fix (cfg resolved)."""
    for name, section in (("model", cfg.model), ("tokenizer", cfg.tokenizer), ("data", cfg.data), ("train", cfg.train)):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if hints[f.name] in (int, float):
                key, value = f"{name}.{f.name}", getattr(section, f.name)
                low, high = BOUNDS[key]
                if not low <= value <= high:  # NaN fails too
                    derived = f", or {DERIVED[key]}" if key in DERIVED else ""
                    raise ConfigError(
                        f"{key}={value} is out of range; set a value in [{_number(low)}, {_number(high)}]{derived}"
                    )
    try:  # YAML's "\uD800" escape: no tokenizer can encode it, and the sample after training would fail
        cfg.train.sample_prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("train.sample_prompt is not valid Unicode text (a lone surrogate); fix the string") from None
    if "\0" in str(cfg.out_dir):  # YAML's "\0" escape: no path can hold it
        raise ConfigError(f"out_dir holds a NUL character ({str(cfg.out_dir)!r}); fix the path")
    try:  # YAML's "\uD800" escape: a lone surrogate names no file
        os.fsencode(str(cfg.out_dir))
    except UnicodeEncodeError:
        raise ConfigError(
            f"out_dir {str(cfg.out_dir)!r} is not a valid file name (a lone surrogate); fix the path"
        ) from None
    if not str(cfg.out_dir).strip():  # an empty path would be the current directory, filled with run files
        raise ConfigError("out_dir is empty; name the run directory, e.g. out_dir=runs/mine")
    m, t, tok = cfg.model, cfg.train, cfg.tokenizer
    # Checks between fields, each built only when it fails (a divisor list can be long).
    if m.arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}, got '{m.arch}'")
    if m.arch == "recurrent":  # no heads, no RoPE: their checks do not apply (presets it extends may set n_head)
        for key in ATTENTION_ONLY:
            if getattr(m, key) != getattr(ModelConfig, key):
                raise ConfigError(
                    f"model.{key} applies to model.arch=llama only (a recurrent model has no attention); drop it"
                )
    elif m.head_size % 2:
        raise ConfigError(f"model.head_size={m.head_size} must be even for RoPE (or 0: dim / n_head)")
    elif m.dim % m.n_head:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_head={m.n_head}; {pick_n_head(m)}")
    elif m.head_dim % 2:
        raise ConfigError(f"model.dim / model.n_head = {m.head_dim} must be even for RoPE; {pick_n_head(m)}")
    elif m.n_head % m.kv_heads:
        raise ConfigError(
            f"model.n_head={m.n_head} is not divisible by model.n_kv_head={m.n_kv_head}; "
            f"pick n_kv_head among {divisors(m.n_head)}"
        )
    if tok.kind not in ("sentencepiece", "char"):
        raise ConfigError(f"tokenizer.kind must be 'sentencepiece' or 'char', got '{tok.kind}'")
    if tok.model_type not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer.model_type must be 'bpe' or 'unigram', got '{tok.model_type}'")
    if tok.kind != "char" and tok.vocab_size < MIN_SENTENCEPIECE_VOCAB:
        raise ConfigError(
            f"tokenizer.vocab_size must be >= {MIN_SENTENCEPIECE_VOCAB} (256 byte-fallback pieces + specials + "
            f"merges), got {tok.vocab_size}"
        )
    if t.min_lr > t.lr:
        raise ConfigError(
            f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}; lower train.min_lr (lr / 10 is usual)"
        )
    if t.warmup_steps >= t.max_steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} must be below train.max_steps={t.max_steps}; "
            f"set train.warmup_steps={t.max_steps // 10} or -1 (a tenth of max_steps, at most 50)"
        )
    if t.warmup_steps > t.lr_decay_steps:
        raise ConfigError(
            f"train.lr_decay_steps={t.lr_decay_steps} must be at least train.warmup_steps={t.warmup_steps}; "
            "raise it or set 0 (max_steps)"
        )
    if t.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"train.dtype must be 'float32' or 'bfloat16', got '{t.dtype}'")


def pick_n_head(m: ModelConfig) -> str:
    """The fix for a head count that does not fit model.dim: the counts whose head width RoPE can pair."""
    fitting = [k for k in divisors(m.dim) if m.head_size or (m.dim // k) % 2 == 0]
    return f"pick n_head among {fitting}" if fitting else "make model.dim even"


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def load_config(config: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML preset or file (default: the tiny preset) < key=value overrides; resolved, validated."""
    cfg = Config()
    if config is not None and not config.strip():  # an empty $CFG in a script: not the default preset
        raise ConfigError("--config is empty; name a preset (e.g. --config small) or a YAML file, or drop it")
    apply_dict(cfg, read_yaml(resolve_config_path(config or DEFAULT_PRESET)))
    apply_dict(cfg, parse_overrides(overrides or []))
    resolve(cfg)
    validate(cfg)
    # A new run's directory only: an existing run's config.yaml names its own directory, which may be the
    # current one (craft-export . from inside the run was refused)
    if os.path.realpath(cfg.out_dir) in (os.path.realpath("."), os.path.abspath(os.sep)):  # '.' or '/': the same
        raise ConfigError(
            f"out_dir={cfg.out_dir} is the current or the root directory; name a run directory, e.g. out_dir=runs/mine"
        )
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """A Config from a resolved mapping (a run directory's config.yaml), checked like a file."""
    cfg = Config()
    apply_dict(cfg, values)
    resolve(cfg)  # a run written before a key existed gets its default, derived from the run's own values
    validate(cfg)
    return cfg


def read_run_config(run_dir: Path) -> Config:
    """The resolved config.yaml of a craft-train run directory (what --resume and craft-export read)."""
    import yaml

    from craft.run_dir import CONFIG, RunDirError, checkpoint_files, is_run

    path = Path(run_dir) / CONFIG
    if not os.path.lexists(run_dir):
        raise RunDirError(f"run directory {run_dir} does not exist; check the path (craft-train out_dir=... makes one)")
    if os.path.lexists(path) and not path.is_file():  # damaged, not missing: --overwrite would delete the run
        raise RunDirError(
            f"{path} is not a regular file (a directory, or a broken or looping symlink); restore the run's "
            "config.yaml (each checkpoint holds its config)"
        )
    if not path.is_file() and checkpoint_files(run_dir):  # trained: --overwrite would delete its checkpoints
        raise RunDirError(f"{run_dir} has checkpoints but no {CONFIG}; restore it (each checkpoint holds its config)")
    if not path.is_file():
        started = is_run(run_dir)  # craft-train was here: --overwrite replaces only its files
        raise RunDirError(
            f"{run_dir} has no {CONFIG}: not a craft-train run directory, or its training never started"
            + (f" (start it again with: craft-train out_dir={run_dir} --overwrite)" if started else "")
        )
    try:
        values = yaml.safe_load(read_text(path)) or {}
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply; it was written by craft-train: restore it") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a number past Python's 4,300 digits
        raise ConfigError(
            f"{path} is not valid YAML ({getattr(e, 'problem', str(e).split(';')[0])}); "
            "it was written by craft-train: restore it or start a new run"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def resumed_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's own config with key=value overrides, which may change anything but model.* and
    tokenizer.*. Values resolved when the run started (warmup, lr_decay_steps) stay as they were."""
    cfg = read_run_config(run_dir)
    before = (cfg.to_dict()["model"], cfg.to_dict()["tokenizer"])
    changes = parse_overrides(overrides)
    if "out_dir" in changes and os.path.realpath(str(changes["out_dir"])) != os.path.realpath(run_dir):
        raise ConfigError(f"--resume writes the run it resumes ({run_dir}); drop out_dir=")  # it was ignored
    apply_dict(cfg, changes)
    resolve(cfg)
    validate(cfg)
    if (cfg.to_dict()["model"], cfg.to_dict()["tokenizer"]) != before:
        raise ConfigError(
            "--resume cannot change model.* or tokenizer.* keys; start a new run with another out_dir=..."
        )
    cfg.out_dir = str(run_dir)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    import yaml

    from craft.run_dir import atomic_write_bytes

    text = "# Fully resolved configuration of this run (craft-train writes it; craft-export reads it).\n"
    text += yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write_bytes(path, text.encode("utf-8"))
