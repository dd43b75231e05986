"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""


class SpfqError(Exception):
    """A problem with the user's input (file, model, data, option) that we can name in one line."""

    exit_code = 2


class FormatError(SpfqError):
    """A .spfq file that is missing, truncated, corrupt, or from a newer format version."""


class UnsupportedLayerError(SpfqError):
    """A layer was selected for compression whose type the compressor cannot handle."""


class CalibrationError(SpfqError):
    """Calibration data that the model cannot consume (wrong shape, dtype, or empty)."""


_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def watch_interrupts() -> None:
    """Note every Ctrl-C: a native library (TVM's FFI) may catch the KeyboardInterrupt and hand
    back an ordinary error with no text, and interrupted() still tells it apart."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def interrupted() -> bool:
    return _interrupted
