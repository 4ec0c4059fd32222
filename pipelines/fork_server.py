"""A run launcher whose runs start warm: a fork server per code location (issue 17, item 4).

Dagster's default launcher asks the code location's gRPC server to start each run, and the server
spawns a new Python for it (`dagster api execute_run`'s body) that imports Dagster, dagster-dbt,
dbt, DuckDB and the engine, then loads the code location: about 6-7 CPU s before the run's first
step, more than a warm evaluation takes. `ForkServerRunLauncher` (configured in
`dagster_home/dagster.yaml`, so the daemon's schedules and sensors, the UI's launches and `dagster
job launch` use it) hands each run to a fork server instead: a process of the code location's own
Python that has imported all of that and loaded the definitions once, and forks one child per
run. The child runs exactly what `dagster api execute_run` runs (`_execute_run_command_body`), so
the run's events, logs, compute logs and termination stay Dagster's; a run killed (even with
SIGKILL) dies alone, and the server, its parent, sees it end and marks the run failed if it had
not finished. `dagster job execute`, `audiences run` and `execute_in_process` run in their own
process and launch nothing: they do not use it.

The server is started by the first launch that finds none (its output goes to
`fork-server-<key>.log` beside its socket) and serves the launches of one code location, one
environment (`AUDIENCES_*`, DAGSTER_HOME) and one user. It stays warm as long as what its load read
has not changed: the engine's Python files it imported, and every file and folder loading the
definitions read (definitions, sources, the dbt project's manifest, ...). When one has changed,
it refuses the next launch as stale, stops listening and exits once its runs have ended; the
launcher starts a new one, so a run always executes the definitions its files say, as a freshly
spawned process would. It also ends, after its runs, when the process that started it (the
daemon, the web server) is gone.

A fork copies only the thread that forks: the server keeps to one thread of its own, and loading
the code location must not start a library's worker pool (polars' starts on its first parallel
operation, and a child would wait forever on its locks); the idle threads some libraries start on
import (jemalloc's, polars' spill cleaner) hold nothing. dbt's warm-up command in the server
parses, when it must, without dbt_extractor, whose pool would be one. The server's log names its
threads when it starts listening, and says so when a fork finds more.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dagster import _check as check
from dagster._core.events import EngineEventData
from dagster._core.launcher.base import (
    CheckRunHealthResult,
    LaunchRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._core.origin import RepositoryPythonOrigin
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value
from dagster_shared.serdes import deserialize_value

# The run's tags naming its worker: the forked child's pid, and the host the server runs on.
PID_TAG = "audiences/run_worker_pid"
HOST_TAG = "audiences/run_worker_host"
# How long a launch waits for a new server to import everything and load the definitions.
START_TIMEOUT_SECONDS = 600.0
# A server's log (its runs' console output too) is set aside past this size when a server starts.
LOG_ROTATE_BYTES = 16 * 2**20
# How often the server, between launches, reaps ended runs and checks that its starter lives.
POLL_SECONDS = 0.2
# The environment a server's load depends on besides its files: it serves only launchers that
# have the same values (part of its key).
ENVIRONMENT_PREFIXES = ("AUDIENCES_",)
ENVIRONMENT_NAMES = ("DAGSTER_HOME", "PYTHONPATH")
# What a run imports after the code location has loaded (a warm evaluation run, measured: 85
# modules, 1-1.5 s of its wall under load): imported once in the server, so no run pays them.
RUN_MODULES = (
    "dagster._cli.api",
    "dagster._core.execution.plan.active",
    "dagster._core.executor.in_process",
    "dagster._core.storage.local_compute_log_manager",
    "dbt.cli.main",
    "dbt.adapters.sql.impl",
    "dbt.adapters.duckdb.impl",
    "dbt.adapters.duckdb.connections",
    "dbt.include.duckdb",
    "dbt.compilation",
    "dbt.graph.thread_pool",
    "dbt.parser.sql",
    "dbt.runners",
    "dbt.task.build",
    "dbt_common.clients.agate_helper",
    "sqlparse",
    "sqlglot.dialects.duckdb",
    "multiprocessing.pool",
    "multiprocessing.dummy",
    "audiences.delivery.sinks",
)


class ForkServerRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run as a child forked from a warm process of its code location (see the
    module's text). Configured in `dagster.yaml`:

        run_launcher:
          module: pipelines.fork_server
          class: ForkServerRunLauncher
    """

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ):
        self._inst_data = inst_data
        self._start_timeout = start_timeout
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls):
        from dagster import Field

        return {
            "start_timeout": Field(
                float,
                is_required=False,
                default_value=START_TIMEOUT_SECONDS,
                description="Seconds a launch waits for a new fork server to load the code location.",
            )
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        """Hand the run to its code location's fork server (started if there is none, or if the
        one there is stale) and record the child's pid on the run."""
        run = context.dagster_run
        origin = check.not_none(
            run.job_code_origin, "ForkServerRunLauncher: the run has no code origin to load"
        )
        server = ForkServer(origin.repository_origin)
        request = {"run_id": run.run_id, "instance_ref": serialize_value(self._instance.get_ref())}
        pid = server.start_run(request, self._start_timeout)
        self._instance.add_run_tags(run.run_id, {PID_TAG: str(pid), HOST_TAG: socket.gethostname()})
        self._instance.report_engine_event(
            f"Run handed to the code location's fork server (run process pid: {pid}).",
            run,
            EngineEventData.in_process(pid),
            cls=self.__class__,
        )

    def terminate(self, run_id: str) -> bool:
        """Interrupt the run's process, as Dagster's own termination does (SIGINT, which the
        run's execution turns into a canceled run)."""
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        pid = _local_pid(run.tags)
        if pid is None or not _alive(pid):
            return False
        self._instance.report_run_canceling(run)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
            return True
        return False

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        """RUNNING while the run's process lives; FAILED when it is gone before the run finished
        (the fork server marks it failed too, as soon as it sees the process end)."""
        pid = _local_pid(run.tags)
        if pid is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "no run process on this host")
        if _alive(pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(pid))
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"the run's process (pid {pid}) has ended", run_worker_id=str(pid)
        )


def _local_pid(tags: Mapping[str, str]) -> int | None:
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    return int(tags[PID_TAG])


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class StaleServer(Exception):
    """The fork server's load is out of date: it stopped listening; start a new one."""


class ForkServer:
    """The client side of one code location's fork server: where it listens, how to start it,
    and the one request it serves (start a run)."""

    def __init__(self, origin: RepositoryPythonOrigin):
        self.origin = origin
        self.serialized_origin = serialize_value(origin)
        environment = {
            name: value
            for name, value in sorted(os.environ.items())
            if name.startswith(ENVIRONMENT_PREFIXES) or name in ENVIRONMENT_NAMES
        }
        key = hashlib.sha256(
            json.dumps([self.serialized_origin, environment]).encode()
        ).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"audiences-fork-servers-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        self.socket_path = folder / f"{key}.sock"
        self.lock_path = folder / f"{key}.lock"
        self.log_path = folder / f"fork-server-{key}.log"

    def request(self, message: dict, timeout: float = 60.0) -> dict:
        """Send one request and return the server's answer (OSError when none listens)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(self.socket_path))
            connection.sendall(json.dumps(message).encode() + b"\n")
            answer = _read_line(connection)
        if not answer:
            raise ConnectionError(f"the fork server at {self.socket_path} closed the connection")
        return json.loads(answer)

    def start_run(self, request: dict, timeout: float) -> int:
        """The pid of the process the server forked for the run; the server is started first
        when none listens or the one there is stale."""
        with _locked(self.lock_path):
            for _ in range(2):
                try:
                    answer = self.request({"start_run": request})
                except OSError:
                    self._start(timeout)
                    answer = self.request({"start_run": request})
                if answer.get("stale"):
                    self._start(timeout)  # it has stopped listening: a new one
                    continue
                if "error" in answer:
                    raise RuntimeError(f"fork server: {answer['error']}")
                return int(answer["pid"])
        raise StaleServer(f"the fork server at {self.socket_path} was stale twice in a row")

    def _start(self, timeout: float) -> None:
        """Start a server and wait until it listens. It detaches itself (`main`): this process
        only waits for the one it started to say the server's pid."""
        code_pointer = self.origin.code_pointer
        working_directory = getattr(code_pointer, "working_directory", None) or os.getcwd()
        # The runs' console output goes to the log too: one earlier log is kept, not every one.
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                [
                    self.origin.executable_path or sys.executable,
                    "-m",
                    "pipelines.fork_server",
                    str(self.socket_path),
                    self.serialized_origin,
                    str(os.getpid()),
                    str(self.log_path),
                ],
                cwd=working_directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of `dagster dev` does not reach its runs
            )
            with process:
                said = process.stdout.readline() if process.stdout else b""
                process.wait()
        if not said.strip().isdigit():
            raise RuntimeError(f"the fork server did not start; see {self.log_path}")
        pid = int(said)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
                raise RuntimeError(
                    f"the fork server exited before listening; {self.log_path}:\n" + "\n".join(tail)
                )
            with contextlib.suppress(OSError):
                if self.request({"ping": True}, timeout=5).get("pid") == pid:
                    return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise TimeoutError(f"the fork server did not listen within {timeout:.0f} s")

    def stop(self) -> None:
        """Ask the server, if one listens, to stop listening and exit once its runs have ended."""
        with contextlib.suppress(OSError):
            self.request({"stop": True}, timeout=10)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_line(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.strip()


# The server side.


class LoadInputs:
    """What loading the code location read, to tell when a warm load is out of date: the files it
    opened for reading and the folders it scanned (recorded by an audit hook while loading), and the
    source of every module imported from outside the Python installation. A dbt project's
    `target/` is left out but for its manifest: the runs write there, and what the load derives
    from it (a parse, the models' check) follows the project's own files."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.folders: set[str] = set()
        self._recording = False
        self._stamps: dict[str, tuple[int, int] | None] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        sys.addaudithook(self._audit)
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            installed = tuple(
                {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
            )
            for module in list(sys.modules.values()):
                path = getattr(module, "__file__", None)
                if path and not os.path.realpath(path).startswith(installed):
                    self.files.add(os.path.abspath(path))
            self.files = {path for path in self.files if _watched(path, installed)}
            self.folders = {path for path in self.folders if _watched(path, installed)}
            self._stamps = self._current()

    def _audit(self, event: str, arguments: tuple) -> None:
        if not self._recording:
            return
        if event == "open":
            path, mode, flags = arguments
            if isinstance(path, (str, bytes, os.PathLike)) and _reads_only(mode, flags):
                self.files.add(os.path.abspath(os.fsdecode(path)))
        elif event == "os.scandir" and isinstance(arguments[0], (str, bytes, os.PathLike)):
            # glob, rglob and os.walk list folders this way; the import system lists sys.path's
            # folders with os.listdir, which is left out: the modules it imported are watched, and
            # a folder on sys.path may be the working folder, where runs write (a warehouse's lock)
            self.folders.add(os.path.abspath(os.fsdecode(arguments[0] or ".")))

    def _current(self) -> dict[str, tuple[int, int] | None]:
        stamps: dict[str, tuple[int, int] | None] = {}
        for path in self.files | self.folders:
            try:
                stat = os.stat(path)
                stamps[path] = (stat.st_mtime_ns, stat.st_size if path in self.files else 0)
            except OSError:
                stamps[path] = None
        return stamps

    def changed(self) -> list[str]:
        """The recorded files and folders that differ from when the load ended."""
        now = self._current()
        return sorted(path for path, stamp in self._stamps.items() if now.get(path) != stamp)


def _reads_only(mode, flags) -> bool:
    if isinstance(mode, str):
        return not any(letter in mode for letter in "wax+")
    return isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR) == 0


def _watched(path: str, installed: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    if real.startswith((*installed, "/proc/", "/sys/")) or real.endswith(".pyc"):
        return False
    if real.startswith("/dev/") and not real.startswith("/dev/shm/"):  # devices, not files
        return False
    parts = Path(real).parts
    if "__pycache__" in parts:
        return False
    for index, part in enumerate(parts[:-1]):  # in a dbt project's target/: only its manifest
        if part == "target" and Path(*parts[:index], "dbt_project.yml").exists():
            return parts[index + 1 :] == ("manifest.json",)
    return True


class Server:
    """The fork server: loads the code location once, then forks one child per run."""

    def __init__(self, socket_path: Path, serialized_origin: str, starter: int):
        self.socket_path = socket_path
        self.origin = deserialize_value(serialized_origin, RepositoryPythonOrigin)
        self.starter = starter
        self.runs: dict[int, tuple[str, str]] = {}  # child pid -> run id, instance ref
        self.listening: socket.socket | None = None
        self.inputs = LoadInputs()
        self.threads: int | str = 0  # the process's threads when it started listening

    def load(self) -> None:
        """Load the code location, as a run's process would, import what every run imports
        after that (`RUN_MODULES`), and run one dbt command that selects nothing
        (`_warm_dbt_command`), for what dbt builds once per process."""
        import importlib

        from dagster._utils.hosted_user_process import recon_repository_from_origin

        with self.inputs.recording():
            recon_repository_from_origin(self.origin).get_definition()
            for name in RUN_MODULES:
                with contextlib.suppress(ImportError):  # another adapter, another version
                    importlib.import_module(name)
        _warm_dbt_deserializers()
        _warm_dbt_command()

    def serve(self) -> None:
        self.listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a dead server's (the launcher holds the lock)
        old_mask = os.umask(0o177)
        try:
            self.listening.bind(str(self.socket_path))
        finally:
            os.umask(old_mask)
        self._inode = self.socket_path.stat().st_ino
        self.threads = _native_threads()
        self.listening.listen(16)
        print(
            f"fork server {os.getpid()} listening on {self.socket_path} (threads: "
            f"{[thread.name for thread in threading.enumerate()]}, {_native_threads()} in all)",
            flush=True,
        )
        selector = selectors.DefaultSelector()
        selector.register(self.listening, selectors.EVENT_READ)
        while self.listening is not None or self.runs:
            if self.listening is not None:
                for _ in selector.select(POLL_SECONDS):
                    self._answer()
                if not _alive(self.starter):
                    self._stop_listening("the process that started it has ended")
            else:
                time.sleep(POLL_SECONDS)
            self._reap()
        print(f"fork server {os.getpid()} exits: no runs left", flush=True)

    def _stop_listening(self, why: str) -> None:
        if self.listening is None:
            return
        print(f"fork server {os.getpid()} stops listening: {why}", flush=True)
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()
        self.listening.close()
        self.listening = None

    def _answer(self) -> None:
        assert self.listening is not None
        connection, _ = self.listening.accept()
        with connection:
            connection.settimeout(30)
            try:
                message = json.loads(_read_line(connection) or b"{}")
                answer = self._handle(message)
            except Exception as error:
                answer = {"error": f"{type(error).__name__}: {error}"}
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps(answer).encode() + b"\n")

    def _handle(self, message: dict) -> dict:
        changed = self.inputs.changed()
        if "stop" in message:
            self._stop_listening("asked to")
            return {"pid": os.getpid(), "runs": sorted(self.runs)}
        if "ping" in message:
            return {"pid": os.getpid(), "stale": bool(changed), "runs": sorted(self.runs)}
        request = message["start_run"]
        if changed:
            self._stop_listening(f"what its load read has changed: {', '.join(changed[:5])}")
            return {"stale": True, "changed": changed[:20]}
        pid = self._fork(request["run_id"], request["instance_ref"])
        return {"pid": pid}

    def _fork(self, run_id: str, instance_ref: str) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        # What the server holds is never garbage for a run: out of its collections (dbt's runner
        # collects after each command: 0.7 CPU s a run when it walked the server's objects too),
        # and the pages stay shared with the server rather than copied when they are walked.
        gc.collect()
        gc.freeze()
        if _native_threads() != self.threads:  # a thread holding a lock at the fork stays locked
            print(
                f"fork server: {_native_threads()} threads at a fork, {self.threads} when it "
                "started listening (a library's thread pool started in the server?)",
                flush=True,
            )
        pid = os.fork()
        if pid:
            self.runs[pid] = (run_id, instance_ref)
            print(f"fork server: run {run_id} in process {pid}", flush=True)
            return pid
        # The child: the run's process.
        code = 1
        try:
            assert self.listening is not None
            self.listening.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = _execute_run(run_id, instance_ref)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # never the server's own cleanup

    def _reap(self) -> None:
        while self.runs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run_id, instance_ref = self.runs.pop(pid, (None, None))
            if run_id is not None:
                _mark_ended(run_id, instance_ref, pid, status)


def _warm_dbt_deserializers() -> None:
    """Read one of the projects' partial-parse files once: mashumaro writes the code that reads
    each of dbt's manifest classes the first time one is read (about 0.6 CPU s of every dbt
    command that reads the file); done here, every run inherits it."""
    from dbt.contracts.graph.manifest import Manifest
    from dbt.parser.manifest import extended_mashumuro_decoder

    from pipelines.defs.environments import served_settings

    for settings in served_settings().values():
        target = settings.dbt_project_dir / "target"
        for path in [target / "partial_parse.msgpack", *target.glob("partial_parse/*.msgpack")]:
            if path.is_file():
                with contextlib.suppress(Exception):  # another dbt's file: the run reads it
                    Manifest.from_msgpack(path.read_bytes(), decoder=extended_mashumuro_decoder)
                    return


def _warm_dbt_command() -> tuple[int, BaseException | None] | None:
    """Run one dbt command that selects nothing (`build`, in a scratch target folder removed after
    it), in this process, as a run's dbt step would: dbt builds, the first time a process needs
    them and then once for all, the JSON schemas it checks the project and profile against, the
    code that writes its artifacts (mashumaro's), the adapter's caller lookups (`inspect`'s
    module cache), about 0.9 CPU s of a run's first dbt command (measured: 1.2 CPU s against 0.3
    for the next command in one process). Done here, every run inherits them. It reads the
    project like any command; it parses nothing it keeps, opens no warehouse (nothing is
    selected, so no connection) and leaves no thread. Its exit code and error, or None when no
    project is served."""
    import shutil

    from audiences.dbt.runner import run_dbt_here
    from pipelines.defs.dbt_in_process import parse_cache
    from pipelines.defs.environments import served_settings

    settings = next(iter(served_settings().values()), None)
    if settings is None:
        return None
    project = settings.dbt_project_dir
    environment = {**os.environ, **settings.environment_variables()}
    with tempfile.TemporaryDirectory(prefix="audiences-fork-server-dbt-") as scratch:
        parsed = parse_cache(project, environment)
        parsed = parsed if parsed.is_file() else project / "target" / "partial_parse.msgpack"
        if parsed.is_file():  # as a run's: dbt checks it, and parses again if it is out of date
            shutil.copyfile(parsed, Path(scratch, "partial_parse.msgpack"))
        nothing = "tag:audiences-fork-server-selects-nothing"
        arguments = ["build", "--select", nothing, "--exclude", nothing]
        arguments += ["--target-path", scratch, "--log-path", scratch]
        # When the file is another profile's, dbt parses the whole project: without its static
        # parser (dbt_extractor), whose thread pool, started here, would hang every child.
        arguments += ["--no-static-parser"]
        threads = _native_threads()
        code, _, error = run_dbt_here(arguments, environment, project)
    if code:
        print(f"fork server: dbt's warm-up command failed ({code}): {error}", flush=True)
    if _native_threads() != threads:
        print(f"fork server: dbt's warm-up command left threads: {_native_threads()}", flush=True)
    return code, error


def _native_threads() -> int | str:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return "?"


def _execute_run(run_id: str, serialized_instance_ref: str) -> int:
    """What `dagster api execute_run` does with a run, in this (forked) process."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._core.instance import DagsterInstance, InstanceRef
    from dagster._utils.interrupts import capture_interrupts

    instance_ref = deserialize_value(serialized_instance_ref, InstanceRef)
    with capture_interrupts(), DagsterInstance.from_ref(instance_ref) as instance:
        return _execute_run_command_body(
            run_id, instance, lambda event: None, set_exit_code_on_failure=False
        )


def _mark_ended(run_id: str, serialized_instance_ref: str, pid: int, status: int) -> None:
    """A run's process has ended: if its run had not finished (it was killed, or crashed), the
    run is marked failed, saying how its process ended."""
    from dagster._core.instance import DagsterInstance, InstanceRef

    how = (
        f"was killed by signal {os.WTERMSIG(status)} ({signal.Signals(os.WTERMSIG(status)).name})"
        if os.WIFSIGNALED(status)
        else f"exited with code {os.waitstatus_to_exitcode(status)}"
    )
    print(f"fork server: process {pid} of run {run_id} {how}", flush=True)
    try:
        with DagsterInstance.from_ref(deserialize_value(serialized_instance_ref, InstanceRef)) as (
            instance
        ):
            run = instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                message = f"The run's process (pid {pid}) {how} before the run finished."
                instance.report_engine_event(message, run, cls=Server)
                instance.report_run_failed(run, message)
    except Exception:
        traceback.print_exc()
    if threading.active_count() > 1:  # the next child must not inherit a thread's half state
        print(f"fork server: {threading.active_count()} threads after marking a run", flush=True)


def main(arguments: list[str]) -> None:
    """`python -m pipelines.fork_server SOCKET ORIGIN STARTER LOG`, what `ForkServer` starts: the
    server detaches (forks, says its pid on stdout and writes to LOG from then on; the process
    started exits at once), loads the code location and serves until STARTER has ended."""
    socket_path, origin, starter, log = arguments
    if os.fork():
        os._exit(0)
    print(os.getpid(), flush=True)
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    server = Server(Path(socket_path), origin, int(starter))
    started = time.perf_counter()
    server.load()
    print(
        f"fork server {os.getpid()}: code location loaded in {time.perf_counter() - started:.1f} s "
        f"({len(server.inputs.files)} files and {len(server.inputs.folders)} folders watched)",
        flush=True,
    )
    server.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
