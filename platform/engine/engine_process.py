"""EngineProcess: the engine in a child process of its own, so a server's event loop never shares a GIL with the
engine's steps (vLLM's engine-core / API-server split).

The server keeps the asyncio front (`EngineClient`: streams, aborts, adapter calls) and one reader thread; the child
(`child_main`, run by a fresh interpreter) loads the model and runs a `StepLoop`. They talk over one
Unix socket pair in pickled tuples, one message per engine step for all streams:

    server -> child   the EngineConfig, then ("add", rid, prompt_ids, params) | ("abort", rid)
                      | ("call", cid, method, args) | ("stop",)
    child -> server   ("ready", facts) | ("failed", why) | ("out", [(rid, Delta or exception)], stats or None)
                      | ("reply", cid, ok, value)

Requests are validated and their grammars compiled in the child at admission (compiles in a worker thread, off the
step), so a refusal reaches the caller as the stream's first item. The child exits when the server's end closes
(the server died); when the child's end closes (it died) every open stream and call fails with EngineDead and
`alive` turns False, so the server's health check fails and it is replaced. It knows nothing of HTTP or Serve.

With expert shards (`parallel.num_shards`), a server that runs in Ray (a Serve replica) hands the child its cluster:
the GCS address, namespace, runtime_env and the placement group it runs in. The child joins as a driver of its own
and starts the shards in that group's shard bundles, as the engine would in the server's process; the shards are
the child's actors, so they go when it goes.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine.async_engine import EngineClient, EngineDead
from raymoe.platform.engine.step_loop import StepLoop

log = logging.getLogger(__name__)
CHILD = "from raymoe.platform.engine.engine_process import child_main; child_main({fd})"
CALLS = frozenset({"adapters", "load_adapter", "unload_adapter", "expert_load"})   # what a server may call


def _resolve(fut: asyncio.Future, ok: bool, value) -> None:
    if not fut.done():
        fut.set_result(value) if ok else fut.set_exception(value)


class EngineProcess(EngineClient):
    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__()
        cluster = ray_cluster() if cfg.parallel.num_shards > 0 else None
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-c", CHILD.format(fd=theirs.fileno())],
                                      pass_fds=(theirs.fileno(),))
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._cids = itertools.count()
        self._dead: str | None = None                 # why the child is gone, once it is
        self._send((cfg, cluster))
        self.facts = self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="raymoe-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> dict:
        while not self._conn.poll(1.0):               # loading a model takes what it takes; a dead child ends it
            if self._proc.poll() is not None:
                self._conn.close()
                raise RuntimeError(f"the engine process exited with code {self._proc.returncode} while starting "
                                   "(its log is this process's stderr)")
        msg = self._conn.recv()
        if msg[0] != "ready":
            self._conn.close()
            self._proc.wait(timeout=30)
            raise RuntimeError(f"the engine process could not start: {msg[1]}")
        return msg[1]

    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    # ---- requests ------------------------------------------------------------------------------------------------
    async def _submit(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if self._dead:
            raise EngineDead(self._dead)
        self._send(("add", rid, prompt_ids, params))

    def abort(self, request_id: str) -> None:
        if not self._dead:
            try:
                self._send(("abort", request_id))
            except OSError:                           # the child is going: the reader fails what is open
                pass

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    # ---- calls ---------------------------------------------------------------------------------------------------
    async def _call(self, method: str, *args):
        if self._dead:
            raise EngineDead(self._dead)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        cid = next(self._cids)
        self._calls[cid] = (loop, fut)
        self._send(("call", cid, method, args))
        return await fut

    async def adapters(self) -> list[str]:
        return await self._call("adapters")

    async def load_adapter(self, name: str, path: str) -> dict:
        return await self._call("load_adapter", name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._call("unload_adapter", name)

    async def expert_load(self) -> dict[int, list[int]]:
        return await self._call("expert_load")

    # ---- the reader thread ---------------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "out":
                if msg[2] is not None:                # None: unchanged (a busy loop sends stats every 0.1 s)
                    self._stats = msg[2]
                if msg[1]:
                    self._deliver(msg[1])
            elif msg[0] == "reply":
                target = self._calls.pop(msg[1], None)
                if target is not None:
                    target[0].call_soon_threadsafe(_resolve, target[1], msg[2], msg[3])
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._dead = f"the engine process exited (code {code})" if code is not None else "the engine process stopped answering"
        if code not in (0, None) or self._streams:
            log.error("%s with %d requests open", self._dead, len(self._streams))
        err = EngineDead(self._dead)
        self._deliver([(rid, err) for rid in list(self._streams)])
        for cid in list(self._calls):
            loop, fut = self._calls.pop(cid)
            loop.call_soon_threadsafe(_resolve, fut, False, err)

    def shutdown(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send(("stop",))
                self._proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._conn.close()


def ray_cluster() -> dict | None:
    """What a child needs to start expert shards where this process would: the Ray cluster this process is
    connected to (its GCS address, namespace and runtime_env) and the placement group it runs in (a Serve replica's,
    whose bundles 1..N are the shards'). None when this process is not in Ray."""
    import ray
    if not ray.is_initialized():
        return None
    from ray.util import get_current_placement_group
    ctx = ray.get_runtime_context()
    group = get_current_placement_group()
    return {"address": ctx.gcs_address, "namespace": ctx.namespace, "runtime_env": dict(ctx.runtime_env or {}),
            "placement_group": group.id.hex() if group is not None else None}


def _join(cluster: dict):
    """In the child: connect to the server's Ray cluster as a driver; -> the server's placement group (or None)."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup
    ray.init(address=cluster["address"], namespace=cluster["namespace"], runtime_env=cluster["runtime_env"] or None,
             log_to_driver=False, include_dashboard=False)
    pg = cluster["placement_group"]
    return PlacementGroup(PlacementGroupID(bytes.fromhex(pg))) if pg else None


# ---- the child ---------------------------------------------------------------------------------------------------
def serve_engine(fd: int) -> None:
    """The child's main: load the engine the first message describes, then step it until told to stop or until the
    server's end of the socket closes."""
    from raymoe.platform.engine.llm_engine import LLMEngine
    conn = Connection(fd)
    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    try:
        cfg, cluster = conn.recv()
        engine = LLMEngine(cfg, placement_group=_join(cluster) if cluster else None)
    except Exception as e:                            # noqa: BLE001 (the server raises it)
        log.exception("the engine could not start")
        send(("failed", f"{type(e).__name__}: {e}"))
        return
    pending: set[str] = set()                         # requests whose grammars are compiling
    plock = threading.Lock()
    send(("ready", {"pid": os.getpid(), "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size}))
    loop = StepLoop(engine, lambda items, stats: send(("out", items, stats)))
    pool = ThreadPoolExecutor(2, thread_name_prefix="raymoe-engine-call")

    def admit(rid: str, prompt: list[int], params: SamplingParams) -> None:
        try:
            engine.validate(prompt, params)
            grammar = engine.compile_grammar(params.grammar)
        except Exception as e:                        # noqa: BLE001 (the request's refusal)
            grammar, err = None, e
        else:
            err = None
        with plock:
            if rid not in pending:                    # aborted while compiling
                return
            pending.discard(rid)
            if err is None:
                loop.add(rid, prompt, params, grammar)
        if err is not None:
            send(("out", [(rid, err)], loop.stats))

    def call(cid: int, method: str, args: tuple) -> None:
        try:
            send(("reply", cid, True, getattr(engine, method)(*args)))
        except Exception as e:                        # noqa: BLE001 (raised in the server)
            send(("reply", cid, False, e))

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):                   # the server is gone
            break
        if msg[0] == "add":
            _, rid, prompt, params = msg
            grammar = None if params.grammar is None else engine.cached_grammar(params.grammar)
            if params.grammar is not None and grammar is None:
                with plock:
                    pending.add(rid)
                pool.submit(admit, rid, prompt, params)
            else:
                loop.add(rid, prompt, params, grammar)
        elif msg[0] == "abort":
            with plock:
                pending.discard(msg[1])
            loop.abort(msg[1])
        elif msg[0] == "call":
            _, cid, method, args = msg
            if method in CALLS:
                pool.submit(call, cid, method, args)
            else:
                send(("reply", cid, False, ValueError(f"the engine process has no call {method!r}")))
        elif msg[0] == "stop":
            break
    loop.stop()
    engine.close()
    pool.shutdown(wait=False, cancel_futures=True)
    conn.close()


def child_main(fd: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_engine(fd)
    os._exit(0)                                       # daemon threads (torch's, the pool's) do not hold exit up
