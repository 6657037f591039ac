"""Exception classes the math plugin raises by name (`wasmq_errors.OutOfRange`,
`wasmq_errors.GaveUp`): a Python client that can import this module catches them as these
very classes, with the arguments the task gave."""


class OutOfRange(Exception):
    """A value outside its allowed range: args are (value, low, high)."""


class GaveUp(Exception):
    """A task that stopped retrying: args are (reason, retries)."""
