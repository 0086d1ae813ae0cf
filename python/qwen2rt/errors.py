"""The exceptions qwen2rt raises. Every one derives from Qwen2rtError and from the builtin a caller
would expect (ValueError, FileNotFoundError, MemoryError), and its message names what was wrong."""


class Qwen2rtError(Exception):
    """Base class of every qwen2rt error."""


class ModelNotFoundError(Qwen2rtError, FileNotFoundError):
    """A model path, file or registry name that does not exist."""


class FormatError(Qwen2rtError, ValueError):
    """A file that is malformed: truncated, bad JSON, offsets out of range, wrong sizes."""


class UnsupportedModelError(Qwen2rtError, ValueError):
    """A well-formed model that qwen2rt does not run: another architecture, an option not implemented."""


class InvalidInputError(Qwen2rtError, ValueError):
    """A bad argument: a token id outside the vocabulary, a bad sampling parameter, a malformed chat."""


class ContextLengthError(InvalidInputError):
    """A prompt or position beyond the model's max_context."""


class OutOfMemoryError(Qwen2rtError, MemoryError):
    """A model or KV cache that would not fit in the memory available."""


class ModelBusyError(Qwen2rtError, RuntimeError):
    """A Model used from a second thread while a call or an unfinished stream holds it."""
