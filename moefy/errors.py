"""User-facing errors: each message says what to change. The CLI prints them as one line, exit 2."""


class MoefyError(ValueError):
    pass


class ConfigError(MoefyError):
    pass


class DataError(MoefyError):
    pass


class ModelLoadError(MoefyError):
    pass


class UnsupportedModel(ModelLoadError):
    pass


class NonFiniteActivations(MoefyError):
    pass


class OutputExists(MoefyError):
    pass


class OutOfSpace(MoefyError):
    pass


class OutOfMemory(MoefyError):
    pass


class ResumeMismatch(MoefyError):
    pass
