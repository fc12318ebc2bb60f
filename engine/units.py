"""Physical units: the voxel size is carried in Å; lengths in nm become voxels here only."""


def nm_to_vox(length_nm, voxel_size_a: float):
    """Convert a length (float or array) in nm to voxels of `voxel_size_a` Å."""
    return length_nm * 10.0 / voxel_size_a


def vox_to_nm(length_vox, voxel_size_a: float):
    """Convert a length (float or array) in voxels of `voxel_size_a` Å to nm."""
    return length_vox * voxel_size_a / 10.0
