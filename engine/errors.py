"""The one exception type for problems a user can fix (bad file, bad option, bad voxel size)."""


class CryovesError(Exception):
    """A user-fixable problem; the message names the file or option, the value found and the fix."""
