"""Errors raised by the data readers and datasets; both are ValueErrors that name the file and entry, and both end a
program with the configuration-or-data exit code."""

from mrgfast.common.exit_codes import CONFIG


class DataFormatError(ValueError):
    """An annotation file is missing or malformed: the message names the file, the entry and what was expected."""

    exit_code = CONFIG


class BadSampleError(ValueError):
    """One sample cannot be used (missing or corrupt image, empty text): the message names the sample and path.

    `reason` is a short key ("missing_image", "corrupt_image", "empty_report", ...) under which a
    reader or dataset counts the sample when it skips it (`skip_bad_samples=True`).
    """

    exit_code = CONFIG

    def __init__(self, message: str, sample_id: str = "", path: str = "", reason: str = "bad_sample"):
        super().__init__(message)
        self.sample_id = sample_id
        self.path = path
        self.reason = reason
