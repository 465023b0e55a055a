"""Typed settings to and from config sections: an algorithm's `Hyperparameters` or a mechanism's `Settings` is a
NamedTuple whose fields may themselves be NamedTuples (FedSND's `synthesis`, `distillation`, …), read from a
nested mapping (`{"synthesis": {"steps": 20}}`) and written back as one.
"""

from collections.abc import Mapping
from typing import NamedTuple

from fedsnd_jax.errors import InputError, require


def is_settings(value) -> bool:
  """Whether `value` is a NamedTuple (a settings object, or a nested part of one)."""
  return isinstance(value, tuple) and hasattr(value, "_fields")


def as_dict(settings: NamedTuple) -> dict:
  """The settings as a nested dict (a nested NamedTuple becomes a dict of its own)."""
  return {k: as_dict(v) if is_settings(v) else v for k, v in settings._asdict().items()}


def moved_error(old: str, new: str) -> InputError:
  """The error for a field of an earlier layout, naming its new place."""
  return InputError(new, f"the field {old} is now {new} (--config.{new}=...)")


def from_dict(cls: type, values: Mapping | None, section: str, moved: Mapping[str, str] | None = None):
  """`cls` with the overrides in `values` (None: the defaults); a nested part takes a mapping of its own, or
  its fields come as dotted names ({"synthesis.steps": 20} is {"synthesis": {"steps": 20}}).

  Args:
    cls: the NamedTuple class. values: field → value (a mapping for a nested part). section: the dotted config
      name of `cls` ("fedsnd", "fedsnd.synthesis"), for errors. moved: dotted names of an earlier layout → their
      new place ("fedsnd.noise_steps" → "fedsnd.synthesis.steps").

  Raises:
    InputError: a field `cls` does not have (naming its new place if it moved), or a value where a nested part
      is (or the reverse).
  """
  values = _nested(values or {})
  for field in sorted(values):
    dotted = f"{section}.{field}"
    if field not in cls._fields:
      if moved and dotted in moved:
        raise moved_error(dotted, moved[dotted])
      raise InputError(dotted, f"{section} has no such field; it has: {', '.join(cls._fields) or 'none'}")
    default, value = cls._field_defaults.get(field), values[field]
    if is_settings(default) and not isinstance(value, type(default)):
      require(isinstance(value, Mapping), dotted, f"is a section, not the value {value!r}")
      values[field] = from_dict(type(default), value, dotted, moved)
    else:
      require(not isinstance(value, Mapping), dotted, "is a value, not a section")
  return cls(**values)


def _nested(values: Mapping) -> dict:
  """{"a.b": 1, "a": {"c": 2}, "d": 3} -> {"a": {"b": 1, "c": 2}, "d": 3} (one level; `from_dict` recurses)."""
  out = {}
  for key, value in values.items():
    head, dot, rest = key.partition(".")
    if dot:
      key, value = head, {rest: value}
    out[key] = {**out[key], **value} if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
  return out
