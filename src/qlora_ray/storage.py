"""Where Tune keeps trial results and checkpoints: a local directory or a filesystem URI.

On a multi-node cluster every node must see it: a shared mount (NFS, EFS) or a URI that
pyarrow opens (s3://bucket/path, gs://bucket/path, file:///abs/path). Tune syncs each
trial's results and checkpoints there; `--resume` and publishing read them back from there.
"""

from __future__ import annotations

from pyarrow import fs

from qlora_ray.config import Config, ConfigError


def root(config: Config) -> str:
    """The storage root: the configured URI or directory, else <output_dir>/tune."""
    return config.storage or str(config.tune_dir)


def open_root(uri: str) -> tuple[fs.FileSystem, str]:
    try:
        return fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:
        raise ConfigError(f"storage {uri!r}: pyarrow cannot open it ({str(e).splitlines()[0]})") from None


def experiment_path(config: Config, name: str) -> str:
    return f"{root(config).rstrip('/')}/{name}"


def experiments(config: Config) -> list[str]:
    """Names of the sweeps under the storage root, oldest first."""
    filesystem, path = open_root(root(config))
    infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory and i.base_name.startswith("sweep-"))


def checkpoint_usage(config: Config, name: str) -> tuple[int, int]:
    """(bytes, checkpoints) the sweep's trial checkpoints take in storage."""
    filesystem, path = open_root(experiment_path(config, name))
    total, dirs = 0, set()
    for info in filesystem.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True)):
        parts = info.path[len(path):].strip("/").split("/")
        if info.type == fs.FileType.File and len(parts) >= 3 and parts[1].startswith("checkpoint_"):
            total += info.size
            dirs.add((parts[0], parts[1]))
    return total, len(dirs)
