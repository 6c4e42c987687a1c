"""The ways a config comes in: a config file, then --key=value flags, and --help.

    python train.py --config configs/demo.py --learning_rate=3e-5 --max-steps 10

A config file is Python (its lowercase top-level names are knobs; modules, functions, classes, _private and
UPPER_CASE names are left alone), JSON or YAML (a flat mapping of knobs, or AlignTune's nested schema: compat.py).
Flags come after and win: `--key=value` or `--key value`, dashes or underscores; AlignTune's flag names work too.
"""
import ast
import dataclasses
import json
import os
import types

import compat
from common import did_you_mean
from config import FIELDS, Config, base_type, make


def load(argv):
    """The Config of a command line: the config file's values, then the flags on top (--percent slices the split)."""
    path, flags = parse_args(argv)
    return make(compat.fold_percent({**(read_file(path) if path else {}), **flags}))


def parse_args(argv):
    """(config file or None, {key: value}) from `--config FILE --key=value --key value ...`; AlignTune's
    flag names are aliases (compat.FLAGS, SHORT, SWITCHES, COLUMNS), and its --type/--algo sets what the algorithm
    implies unless a flag sets it too; --epochs without --max-steps trains for those epochs."""
    path, flags, algo, i = None, {}, {}, 0
    known = [*FIELDS, *compat.FLAGS, *compat.SWITCHES, *compat.COLUMNS, "percent", "config", "type", "algo"]
    while i < len(argv):
        arg = compat.SHORT.get(argv[i], argv[i])
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --key=value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        key = compat.FLAGS.get(name, name)
        if key not in known and key != "algorithm":
            raise ValueError(f"unknown flag --{name}{did_you_mean(name, known)}")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--") or argv[i + 1] in compat.SHORT:
                if key in compat.SWITCHES or key in FIELDS and base_type(FIELDS[key].type)[0] is bool:
                    value = "true"  # a bare boolean flag: --use-peft, --bf16
                else:
                    raise ValueError(f"--{name} needs a value: --{name}=VALUE")
            else:
                i, value = i + 1, argv[i + 1]
        if key == "config":
            path = value
        elif key in ("type", "algo", "algorithm"):  # AlignTune's --type nmgrpo
            algo = compat.algo_settings(value)
        elif key in compat.SWITCHES:  # --bf16, --4bit
            field, setting = compat.SWITCHES[key]
            if parse_value(name, value, bool):
                flags[field] = setting
        elif key in compat.COLUMNS:  # --col-prompt question
            flags.setdefault("column_mapping", {})[value] = compat.COLUMNS[key]
        elif key == "percent":
            flags["percent"] = parse_value(name, value, float)
        else:
            text = value.strip()
            if key in compat.LISTS and not text.startswith("[") and text.lower() not in ("none", "null"):
                items = [v.strip() for v in text.split(",") if v.strip()]  # --reward-functions a,b
                value = f"[{', '.join(items)}]" if key == "reward_function_weights" else json.dumps(items)
            flags[key] = parse_value(key, value)
        i += 1
    for k, v in algo.items():
        flags.setdefault(k, v)
    if "num_epochs" in flags and "max_steps" not in flags:
        flags["max_steps"] = -1
    return path, flags


def parse_value(key, text, tp=None):
    """Turn the string of a `--key=value` flag into the field's type (or `tp`); ValueError names the key."""
    tp, optional = (tp, False) if tp else base_type(FIELDS[key].type)
    low = text.strip().lower()
    if optional and (low == "null" or low == "none" and key != "chat_template"):  # chat_template 'none': plain text
        return None
    try:
        if tp is bool:
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float):
            return tp(float(text)) if tp is int and float(text).is_integer() else tp(text)
        if tp in (list, dict) or tp is None:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return ast.literal_eval(text) if tp is not None else text
        return text
    except (ValueError, SyntaxError):
        want = {bool: "true or false", int: "an integer", float: "a number", list: "a list like [1, 2]",
                dict: "a mapping like {\"a\": 1}"}.get(tp, str(tp))
        raise ValueError(f"--{key}={text!r} is not {want}") from None


def read_file(path):
    """The {field: value} mapping of a .py, .json or .yaml config file."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        scope = {"__file__": os.path.abspath(path), "__name__": "__config__"}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
        return compat.rename({k: v for k, v in scope.items() if k in FIELDS or not (
            k.startswith("_") or k.isupper() or callable(v) or isinstance(v, types.ModuleType) or _is_typing(v))})
    if ext not in (".json", ".yaml", ".yml"):
        raise ValueError(f"config file {path!r}: use a .py, .json or .yaml file")
    yaml, kind = None if ext == ".json" else _yaml(), "JSON" if ext == ".json" else "YAML"
    try:
        with open(path) as f:
            data = json.load(f) if yaml is None else yaml.safe_load(f) or {}
    except (json.JSONDecodeError, *(() if yaml is None else (yaml.YAMLError,))) as e:
        raise ValueError(f"config file {path!r} is not valid {kind}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} should hold a mapping of fields")
    data = compat.from_nested(data, FIELDS) if compat.is_nested(data) else compat.rename(data)
    for k, v in data.items():  # PyYAML reads 1e-5 (no dot) as a string
        if yaml and isinstance(v, str) and k in FIELDS and base_type(FIELDS[k].type)[0] is float:
            data[k] = parse_value(k, v)
    return data


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ValueError("reading YAML configs needs PyYAML: pip install pyyaml") from None
    return yaml


def _is_typing(v):
    return getattr(v, "__module__", None) == "typing" or isinstance(v, dataclasses.Field)


def describe():
    """Every knob with its default and doc, grouped: the body of `--help`."""
    lines, group = [], None
    for f in dataclasses.fields(Config):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"\n{group}:")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  --{f.name}={default!r}\n      {f.metadata['doc']}")
    lines.append("\nAlignTune's flags work too: --type/--algo NAME, " +
                 ", ".join(f"--{k.replace('_', '-')} ({v})" for k, v in compat.FLAGS.items()) + ", " +
                 ", ".join(f"--{k} ({f}={v!r})" for k, (f, v) in compat.SWITCHES.items()) + ", " +
                 ", ".join(f"--{k.replace('_', '-')} COLUMN (its {r})" for k, r in compat.COLUMNS.items()) +
                 ", --percent P (split[:P%]), " + ", ".join(f"{s} ({f})" for s, f in compat.SHORT.items()))
    return "\n".join(lines)
