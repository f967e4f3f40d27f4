"""The one exception type of the workbench.

Every error raised for bad input is a ``WorkbenchError`` (a ``ValueError``) whose
message names what was wrong and what is accepted.
"""


class WorkbenchError(ValueError):
    """Bad input: the message says what was wrong and what is accepted."""


def one_of(kind: str, value: object, valid) -> WorkbenchError:
    """An error for an unknown ``kind`` named ``value``, listing the valid choices."""
    valid = list(valid)
    shown = ", ".join(map(str, valid[:40])) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
    return WorkbenchError(f"unknown {kind} {value!r}; valid: {shown}")
