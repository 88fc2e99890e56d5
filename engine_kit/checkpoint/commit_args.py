"""The argument checks of :class:`~engine_kit.checkpoint.directory.CheckpointDirectory`'s writing methods.

They run before anything is written, so a bad argument leaves the
directory as it was; :meth:`~CheckpointDirectory.commit` and
:meth:`~CheckpointDirectory.commit_async` share them, so both refuse the
same things on the calling thread.

>>> checked_record("step00000001-00001.ekpt", 1, 0, ["last"], 0.5, None)
(('last',), 0.5, None)
>>> checked_folder("branched-from-step00000100")
'branched-from-step00000100'
>>> check_count("step", 3)
3
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine_kit.checkpoint.registry import CHECKPOINT_SUFFIX, validate_name
from engine_kit.errors import fix_message


def check_count(key: str, value: object) -> int:
    """``value`` when it is an integer >= 0 (a step, an epoch), else ValueError naming ``key``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(fix_message(f"{key}={value!r} is not an integer >= 0.", f"pass the engine's {key} count."))
    return value


def checked_record(
    name: str, step: int, epoch: int, tags: Iterable[str], metric: float | None, run_id: str | None
) -> tuple[tuple[str, ...], float | None, str | None]:
    """A new checkpoint's record arguments checked: ``(tags, metric, run_id)`` normalized."""
    validate_name(name)
    check_count("step", step)
    check_count("epoch", epoch)
    tags = tuple(tags)
    if not all(isinstance(tag, str) for tag in tags):
        raise TypeError(fix_message(f"tags={tags!r} must all be str.", "pass e.g. tags=('last',)."))
    if metric is not None:
        try:
            metric = float(metric)
        except (TypeError, ValueError) as exc:
            raise TypeError(fix_message(f"metric={metric!r} is not a number.", "pass a float (NaN/inf allowed) or None.")) from exc
    if run_id is not None and not isinstance(run_id, str):
        raise TypeError(fix_message(f"run_id={run_id!r} is not a str.", "pass a string naming the run, or None."))
    return tags, metric, run_id


def checked_tags(path: str, tags: Mapping[str, Iterable[str]], allowed: set[str]) -> dict[str, tuple[str, ...]]:
    """``tags`` as name -> tuple, every name in ``allowed`` (the indexed names of ``path``) and every tag a str."""
    new_tags = {name: tuple(values) for name, values in tags.items()}
    unknown = sorted(set(new_tags) - allowed)
    if unknown:
        raise ValueError(fix_message(f"{unknown} are not registered checkpoints in {path!r}.", "pass names from entries()."))
    if not all(isinstance(tag, str) for values in new_tags.values() for tag in values):
        raise TypeError(fix_message(f"tags={new_tags!r} must all be str.", "pass e.g. {'step-1.ekpt': ('best',)}."))
    return new_tags


def checked_names(path: str, names: Iterable[str], indexed: set[str]) -> list[str]:
    """``names`` as a list (a single str is one name), each one among ``indexed`` (the indexed names of ``path``)."""
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        validate_name(name)
        if name not in indexed:
            raise ValueError(fix_message(f"{name!r} is not a registered checkpoint in {path!r}.", "pass names from entries()."))
    return wanted


def checked_folder(folder: str) -> str:
    """``folder`` if it is a plain subfolder name: no separator, not hidden, not ``..``, not a checkpoint name."""
    if not isinstance(folder, str) or not folder or folder.startswith(".") or folder.endswith(CHECKPOINT_SUFFIX) or any(
        bad in folder for bad in ("/", "\\", "\0", "..")
    ):
        raise ValueError(fix_message(f"folder={folder!r} is not a plain subfolder name.", "pass e.g. 'branched-from-step00000100'."))
    return folder
