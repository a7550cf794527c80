"""Hot reload of the policies and the config files, on a file change or on SIGHUP.

A reload reads and validates everything off the event loop (``load_state`` in a thread), then
swaps it in with :meth:`Runtime.apply` on the loop (one reference): requests in flight finish
on the state they started with, the next ones see the new one. A change that does not load is
refused with one log line naming ``file:line`` and the problem; the last good state keeps
serving.

What is watched (``watchfiles``, non-recursive): the policy directory, the directory of every
config file, and the real directory behind every symlinked file. Kubernetes ConfigMap volumes
publish an update by renaming a new ``..data`` symlink over the old one in the mounted directory;
that rename is an event in the policy directory itself, and the policy files (symlinks through
``..data``) then read the new content. Events that change no byte the load reads (editor swap
files, ``..data_tmp``) are recognised by :func:`~stagedoor.runtime.input_fingerprint` and
ignored without a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchfiles import Change, awatch

from stagedoor.config import ConfigError
from stagedoor.gcfreeze import freeze_loaded
from stagedoor.logsetup import configure_logging
from stagedoor.policy import PolicyLoadError, PolicyProblem, policy_files
from stagedoor.policydiff import plugin_names, removed
from stagedoor.runtime import Runtime, State, input_fingerprint, load_state

log = logging.getLogger("stagedoor.reload")

#: watchfiles batching: a batch is yielded once no event came for STEP ms (at most DEBOUNCE).
WATCH_STEP_MS = 100
WATCH_DEBOUNCE_MS = 1000
MAX_PROBLEMS_IN_LINE = 5

#: Names editors give their temporary and backup files: sed -i's ``sedXXXXXX``, vim's swap files
#: and ``4913`` probe, ``name~`` backups, emacs' ``.#name`` locks and ``#name#`` autosaves,
#: JetBrains' ``___jb_tmp___``, gedit's ``.goutputstream-*``, ``*.tmp``. Never read by a load;
#: their events trigger nothing and are never named in a log line.
EDITOR_TEMP_FILE = re.compile(
    r"sed[A-Za-z0-9]{6}|4913|.*~|\.#.*|#.*#|\..*\.sw[a-p]x?|.*___jb_(?:tmp|old)___"
    r"|\.goutputstream-.*|.*\.tmp")


def is_editor_temp_file(name: str) -> bool:
    """True for an editor's temporary or backup file name (see :data:`EDITOR_TEMP_FILE`)."""
    return not name.startswith("..") and EDITOR_TEMP_FILE.fullmatch(name) is not None


@dataclass(frozen=True)
class WatchPlan:
    """What to watch, and which events matter (also a ``watchfiles`` filter).

    Directories are real paths. Every entry of the policy directory matters; elsewhere only
    the names the load reads (config files, symlink targets) and ``..``-prefixed entries (the
    ConfigMap machinery) do, so a log file next to a config file triggers nothing.
    """

    dirs: tuple[str, ...]
    whole: frozenset[str]
    names: dict[str, frozenset[str]] = field(default_factory=dict)

    def __call__(self, change: Change, path: str) -> bool:
        parent, name = os.path.split(path)
        if is_editor_temp_file(name):
            return False
        return parent in self.whole or name.startswith("..") or \
            name in self.names.get(parent, ())


def watch_plan(config_files: Sequence[str], policy_dir: str) -> WatchPlan:
    """The :class:`WatchPlan` for these inputs, as they are on disk now."""
    names: dict[str, set[str]] = {}

    def add(path: str) -> None:
        parent, name = os.path.split(path)
        names.setdefault(parent, set()).add(name)

    root = Path(policy_dir)
    whole = os.path.realpath(root)
    if root.is_symlink():  # a swapped directory symlink is an event in its parent
        add(os.path.join(os.path.realpath(root.absolute().parent), root.name))
    for f in config_files:
        add(os.path.join(os.path.realpath(Path(f).absolute().parent), Path(f).name))
        if Path(f).is_symlink():
            add(os.path.realpath(f))
    with contextlib.suppress(OSError):
        for f in policy_files(root):
            if f.is_symlink():
                add(os.path.realpath(f))
    dirs = {d for d in [whole, *names] if os.path.isdir(d)}
    return WatchPlan(tuple(sorted(dirs)), frozenset({whole}),
                     {d: frozenset(n) for d, n in names.items() if d != whole})


def describe_changes(changes: Iterable[tuple[Change, str]], limit: int = 3) -> str:
    """``insights.yaml modified, ..data added`` (at most ``limit`` names, then a count)."""
    items = sorted({f"{Path(path).name} {change.name}" for change, path in changes
                    if not is_editor_temp_file(Path(path).name)})
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f" and {len(items) - limit} more"
    return text or "file change"


def refusal_message(problems: Sequence[PolicyProblem | str]) -> str:
    """Every problem (``file:line: message``) on one line."""
    texts = [" ".join(str(p).split()) for p in problems]
    text = "; ".join(texts[:MAX_PROBLEMS_IN_LINE])
    if len(texts) > MAX_PROBLEMS_IN_LINE:
        text += f"; and {len(texts) - MAX_PROBLEMS_IN_LINE} more problem(s)"
    return text


class Reloader:
    """mitmproxy addon: watches the inputs, reloads on change or :meth:`trigger` (SIGHUP)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stats: dict[str, int] = {"success": 0, "failure": 0}
        self.last_success: float | None = None  # epoch seconds
        self._refused: str | None = None  # fingerprint of the inputs last refused
        self._refusals = 0  # refused reloads since the last good state was (re)established
        self._lock: asyncio.Lock | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    def running(self) -> None:
        self._lock = self._lock or asyncio.Lock()
        self._stop = asyncio.Event()
        if self.runtime.state.operations.watch:
            self._spawn(self._watch(), "stagedoor-watch")

    def done(self) -> None:
        if self._stop is not None:
            self._stop.set()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def trigger(self, reason: str = "SIGHUP") -> None:
        """Reload now, even if no file changed (signal handler; call on the loop's thread)."""
        self._spawn(self.reload(reason, force=True), "stagedoor-reload")

    # -- reloading -------------------------------------------------------------------------------
    async def reload(self, trigger: str, force: bool = False) -> bool | None:
        """Load, validate and swap in. True: applied; False: refused; None: nothing changed."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one at a time; a queued one then sees the newest files
            runtime = self.runtime
            files, policy_dir = list(runtime.config_files), runtime.policy_dir
            fingerprint = await asyncio.to_thread(input_fingerprint, files, policy_dir)
            if not force and fingerprint in (runtime.state.fingerprint, self._refused):
                if fingerprint == runtime.state.fingerprint and self._refusals:
                    self._recovered("the files are back to what is being served")
                    self._refused = None
                return None
            started = time.perf_counter()
            try:
                # Built off the loop; the verifier and authorizer are carried over when their
                # settings did not change (runtime.state cannot change meanwhile: the lock).
                state = await asyncio.to_thread(load_state, files, policy_dir, runtime.state)
            except PolicyLoadError as exc:
                problem = refusal_message(exc.problems)
            except ConfigError as exc:
                problem = refusal_message([str(exc)])
            except Exception as exc:  # a reload must never take the proxy down
                log.debug("reload failed", exc_info=True)
                problem = f"unexpected {type(exc).__name__}: {exc}"
            else:
                self._apply(state, trigger, started)
                return True
            self._refused = fingerprint
            self._refusals += 1
            self.stats["failure"] += 1
            log.error("stagedoor reload refused (%s), still serving the last good policy: %s",
                      trigger, problem)
            return False

    def _apply(self, state: State, trigger: str, started: float) -> None:
        runtime = self.runtime
        old_ops = runtime.state.operations
        gone = removed(runtime.state.policies, state.policies)
        report = runtime.apply(state)
        self._refused = None
        freeze_loaded(reload=True)  # the new policies out of the collector's full passes
        ops = state.operations
        if (ops.log_level, ops.log_format) != (old_ops.log_level, old_ops.log_format):
            configure_logging(ops.log_level, ops.log_format)
        if report.verifier_replaced:
            self._spawn(state.verifier.prefetch(), "stagedoor-jwks-prefetch")
        self.stats["success"] += 1
        self.last_success = time.time()
        kept = [name for name, replaced in (("token verifier", report.verifier_replaced),
                                            ("permission cache", report.authorizer_replaced))
                if not replaced]
        log.info("stagedoor reloaded (%s): %d plugin(s), %d route(s) in %.1f ms; plugins: %s%s",
                 trigger, report.plugins, report.routes, (time.perf_counter() - started) * 1000,
                 plugin_names(state.policies), f"; kept the {' and '.join(kept)}" if kept else "")
        if gone:
            log.warning("stagedoor reload removed %s", gone.describe())
        if self._refusals:
            self._recovered("the edit loads and is served")
        if report.restart_needed:
            log.warning("stagedoor: %s changed; that takes effect at the next restart",
                        ", ".join(report.restart_needed))

    def _recovered(self, how: str) -> None:
        """The "back to good" line after one or more refused reloads."""
        log.info("stagedoor reload recovered: %s (after %d failed reload(s))", how, self._refusals)
        self._refusals = 0

    # -- watching --------------------------------------------------------------------------------
    async def _watch(self) -> None:
        assert self._stop is not None
        first = True
        while not self._stop.is_set():
            plan = watch_plan(self.runtime.config_files, self.runtime.policy_dir)
            if first:
                log.info("stagedoor watching %s for changes", ", ".join(plan.dirs))
            watcher = awatch(*plan.dirs, watch_filter=plan, recursive=False,
                             debounce=WATCH_DEBOUNCE_MS, step=WATCH_STEP_MS,
                             stop_event=self._stop)
            # Entering the generator arms the watches (watchfiles sets them up before its first
            # await) and from then on every event is kept for the next answer. Only then catch
            # what changed while the watch was down: re-arming after that reload left a window
            # in which an edit (e.g. right after a moved symlink was picked up) was lost.
            pending = asyncio.ensure_future(anext(watcher))
            try:
                await asyncio.sleep(0)  # the generator runs up to its first await
                if not first:
                    await self.reload("change while re-arming the watch")
                first = False
                while True:
                    try:
                        changes = await pending
                    except StopAsyncIteration:
                        break
                    await self.reload(describe_changes(changes))
                    if watch_plan(self.runtime.config_files, self.runtime.policy_dir) != plan:
                        break  # e.g. a ConfigMap swap moved the real files: re-arm
                    pending = asyncio.ensure_future(anext(watcher))
            except asyncio.CancelledError:
                pending.cancel()  # shutting down (watchfiles sets the stop event on cancel)
                raise
            except Exception as exc:  # a vanished directory, an inotify limit...
                log.warning("stagedoor file watch failed (%s); retrying in 1s (SIGHUP still "
                            "reloads)", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
