"""The one exception type for bad user input; binaries turn it into exit code 2."""


class InputError(ValueError):
  """A user-supplied value is invalid. The message starts with the offending field's name."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def require(ok: bool, field: str, message: str) -> None:
  """Raises InputError(field, message) unless `ok`."""
  if not ok:
    raise InputError(field, message)


def check_range(hyperparameters, section: str, *, positive=(), non_negative=()) -> None:
  """Refuses a NamedTuple's fields that are not finite or out of range, naming them `section.field`."""
  for field in (*positive, *non_negative):
    value = getattr(hyperparameters, field)
    require(value == value and abs(value) != float("inf"), f"{section}.{field}", f"must be finite, got {value}")
    if field in positive:
      require(value > 0, f"{section}.{field}", f"must be > 0, got {value}")
    else:
      require(value >= 0, f"{section}.{field}", f"must be ≥ 0, got {value}")
