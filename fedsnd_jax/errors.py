"""The one exception type for bad user input; binaries turn it into exit code 2."""


class InputError(ValueError):
  """A user-supplied value is invalid. The message starts with the offending field's name."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
