"""The customer's side: submit a lifecycle job on-chain and wait for its result.

Used by ``microvm-blueprint jobs submit``, the end-to-end tests and the benchmarks. Signs locally
with the customer's key (never logged), reads the call id from the ``JobSubmitted`` log of the
receipt, then waits on the query API's ``/jobs/{call_id}/wait`` (woken when the operator's journal
changes) and reads the result log once it is on-chain; without that endpoint it watches
``JobResultSubmitted`` for the call and asks ``/jobs/{call_id}`` why no result came (failed jobs are
never written on-chain). :func:`iter_events` and :func:`wait_vm` are the ``vms watch`` side.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from eth_utils import to_checksum_address

from ..errors import MicrovmBlueprintError
from ..tangle.abi import decode_result, encode_args
from ..tangle.contracts import SUBMIT_JOB, TOPIC_JOB_RESULT_SUBMITTED, TOPIC_JOB_SUBMITTED, selector_bytes
from ..tangle.environment import Secret
from ..tangle.keystore import key_from_hex
from ..tangle.rpc import JsonRpc
from ..tangle.signing import LegacyTx, sign_legacy
from .jobs import JOBS_BY_INDEX, JOBS_BY_NAME, JobDef

SEL_SUBMIT_JOB = selector_bytes(SUBMIT_JOB)


class ClientError(MicrovmBlueprintError):
    pass


def resolve_job(name_or_index: str) -> JobDef:
    if name_or_index.isdigit() and int(name_or_index) in JOBS_BY_INDEX:
        return JOBS_BY_INDEX[int(name_or_index)]
    if name_or_index in JOBS_BY_NAME:
        return JOBS_BY_NAME[name_or_index]
    raise ClientError(f"unknown job {name_or_index!r}; known: {', '.join(JOBS_BY_NAME)}")


_DIGITS = re.compile(r"[0-9]+")


def _parse_uint(typ: str, name: str, text: str) -> int:
    """``text`` as a ``uintN`` (ASCII digits only: ``str.isdigit`` would take ``²``, which ``int`` refuses)."""
    bits = int(typ[4:] or "256")
    if not _DIGITS.fullmatch(text):
        raise ClientError(f"{name} must be an unsigned integer, not {text[:40]!r}")
    value = int(text)
    if value >= 2**bits:
        raise ClientError(f"{name} {value} does not fit in a {typ} (at most {2**bits - 1})")
    return value


def _parse_value(typ: str, name: str, text: str) -> Any:
    if typ.startswith("uint"):
        return _parse_uint(typ, name, text)
    if typ == "string":
        return text
    raise ClientError(f"{name}: arguments of type {typ} cannot be given on the command line")


def encode_job_args(job: JobDef, raw: Sequence[str | Sequence[str]]) -> bytes:
    """Turn command-line strings into the job's ABI argument tuple (flat form).

    One entry per argument of the job: a string for a scalar argument (``string``, ``uintN``), a
    sequence of strings for an array argument (``string[]``, ``uint16[]``: each element parsed as the
    element type; the CLI builds these from ``--ssh-key``/``--port``). Errors name the argument (and
    the element: ``ports[2]``) and are raised before anything is sent."""
    if len(raw) != len(job.arg_types):
        raise ClientError(f"{job.name} takes {len(job.arg_types)} argument(s): {job.signature}")
    values: list[Any] = []
    for typ, name, given in zip(job.arg_types, job.arg_names, raw, strict=True):
        if typ.endswith("[]"):
            if isinstance(given, str):
                raise ClientError(f"{name} is a list ({typ}), not one value")
            values.append([_parse_value(typ[:-2], f"{name}[{i}]", item) for i, item in enumerate(given)])
        else:
            if not isinstance(given, str):
                raise ClientError(f"{name} is one value ({typ}), not a list")
            values.append(_parse_value(typ, name, given))
    return encode_args(job.arg_types, values)


@dataclass(frozen=True)
class Submitted:
    call_id: int
    tx_hash: str
    block_number: int
    receipt_seen_at: float  # time.monotonic() when the receipt was seen


@dataclass(frozen=True)
class Outcome:
    call_id: int
    result: Any | None
    result_tx: str | None
    job_status: dict[str, Any] | None  # from /jobs/{call_id} when no result came


class TangleCustomer:
    """A customer account talking to the Tangle contract of one service."""

    def __init__(self, rpc_url: str, contract: str, service_id: int, key: Secret[str]) -> None:
        self.rpc = JsonRpc(rpc_url, timeout=30)
        self.contract = to_checksum_address(contract)
        self.service_id = service_id
        self._key = key_from_hex(key.reveal())
        self.address = self._key.address
        self._nonce: int | None = None
        self._chain_id: int | None = None
        self._gas_price: int | None = None

    async def aclose(self) -> None:
        await self.rpc.aclose()

    def _tx_data(self, job: JobDef, inputs: bytes) -> bytes:
        from eth_abi import encode

        return SEL_SUBMIT_JOB + encode(["uint64", "uint8", "bytes"], [self.service_id, job.index, inputs])

    async def _take_nonce(self) -> int:
        nonce = self._nonce if self._nonce is not None else await self.rpc.nonce(self.address)
        self._nonce = nonce + 1
        return nonce

    async def sign(self, job: JobDef, inputs: bytes, *, gas: int = 500_000, nonce: int | None = None) -> bytes:
        """A signed ``submitJob`` transaction, not sent; it takes the next local nonce, so calls signed
        in a row must be sent in that order (:meth:`send_signed`). ``nonce``: sign with this one
        instead, leaving the local count alone (to replace a transaction)."""
        if self._chain_id is None or self._gas_price is None:
            self._chain_id = await self.rpc.chain_id()
            self._gas_price = await self.rpc.gas_price()
        tx = LegacyTx(
            nonce=nonce if nonce is not None else await self._take_nonce(),
            gas_price=self._gas_price,
            gas=gas,
            to=self.contract,
            data=self._tx_data(job, inputs),
            chain_id=self._chain_id,
        )
        return sign_legacy(tx, self._key.secret.reveal())

    async def send(self, job: JobDef, inputs: bytes, *, gas: int = 500_000) -> str:
        """Sign and send ``submitJob`` without waiting (local nonces, so sends pipeline)."""
        raw = await self.sign(job, inputs, gas=gas)
        try:
            return await self.rpc.send_raw(raw)
        except MicrovmBlueprintError:
            self._nonce = None  # read it again from the chain: this one may or may not have gone in
            raise

    async def send_signed(self, raws: Sequence[bytes], *, per_request: int = 50) -> list[str]:
        """Send transactions signed by :meth:`sign`, in order, ``per_request`` to a JSON-RPC batch: as
        fast as the node takes them (a request per transaction costs both sides more than the
        transaction). Raises :class:`ClientError` naming the first one the node refused; the ones
        before it were taken."""
        hashes: list[str] = []
        for k in range(0, len(raws), max(1, per_request)):
            chunk = raws[k : k + per_request]
            try:
                answers = await self.rpc.batch([("eth_sendRawTransaction", ["0x" + r.hex()]) for r in chunk])
            except MicrovmBlueprintError:
                self._nonce = None
                raise
            for answer in answers:
                if not isinstance(answer, str) or not answer.startswith("0x"):
                    self._nonce = None
                    raise ClientError(f"transaction {len(hashes) + 1} of {len(raws)} refused by the node: {answer}")
                hashes.append(answer)
        return hashes

    async def wait_submitted(self, tx_hash: str, timeout: float = 60.0) -> Submitted:
        receipt = await self.rpc.wait_receipt(tx_hash, timeout, every=0.01)
        if receipt is None:
            raise ClientError(f"submitJob transaction {tx_hash} not mined after {timeout:.0f}s")
        seen = time.monotonic()
        if int(str(receipt["status"]), 16) != 1:
            raise ClientError(f"submitJob reverted (tx {tx_hash}): is this account a permitted caller?")
        for entry in receipt.get("logs", []):
            topics = entry.get("topics", [])
            if entry.get("address", "").lower() == self.contract.lower() and topics and topics[0] == TOPIC_JOB_SUBMITTED:
                return Submitted(int(topics[2], 16), tx_hash, int(str(receipt["blockNumber"]), 16), seen)
        raise ClientError(f"no JobSubmitted log in {tx_hash}")

    async def submit(self, job: JobDef, inputs: bytes, timeout: float = 60.0) -> Submitted:
        return await self.wait_submitted(await self.send(job, inputs), timeout)

    async def results(self, from_block: int, to_block: int | None = None) -> dict[int, tuple[bytes, str, int]]:
        """call_id -> (result bytes, tx hash, block) for our service's JobResultSubmitted logs."""
        to = to_block if to_block is not None else await self.rpc.block_number()
        out: dict[int, tuple[bytes, str, int]] = {}
        topics = [TOPIC_JOB_RESULT_SUBMITTED, "0x" + self.service_id.to_bytes(32, "big").hex()]
        logs = await self.rpc.get_logs(address=self.contract, topics=topics, from_block=from_block, to_block=to)
        from eth_abi import decode

        for entry in logs:
            call_id = int(entry["topics"][2], 16)
            (result,) = decode(["bytes"], bytes.fromhex(str(entry["data"])[2:]))
            out.setdefault(call_id, (bytes(result), str(entry["transactionHash"]), int(str(entry["blockNumber"]), 16)))
        return out

    async def wait_result(
        self,
        sub: Submitted,
        *,
        timeout: float,
        api_url: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Outcome:
        """Wait for this call's result log; stop early if the operator's journal says it failed. With
        ``api_url``, the query API wakes this wait when the journal changes (no polling); an operator
        without ``/jobs/{call_id}/wait`` is polled as before."""
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        status: dict[str, Any] | None = None
        if api_url:
            outcome = await self._wait_via_api(sub, deadline, api_url, progress)
            if outcome is not None:
                return outcome
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                found = await self.results(sub.block_number)
                if sub.call_id in found:
                    raw, tx, _ = found[sub.call_id]
                    return Outcome(sub.call_id, decode_result("bool", raw), tx, None)
                if api_url:
                    status = await _job_status(http, api_url, sub.call_id)
                    if status and status.get("status") == "failed":
                        return Outcome(sub.call_id, None, None, status)
                if progress:
                    state = (status or {}).get("status", "not seen by the operator yet")
                    progress(f"waiting for the result of call {sub.call_id}: {state} ({time.monotonic() - started:.0f}s)")
                if time.monotonic() > deadline:
                    return Outcome(sub.call_id, None, None, status)
                await asyncio.sleep(0.25)


    async def _wait_via_api(
        self, sub: Submitted, deadline: float, api_url: str, progress: Callable[[str], None] | None
    ) -> Outcome | None:
        """The outcome through ``/jobs/{call_id}/wait?until=result``; ``None``: ask the chain instead
        (no such endpoint, the API unreachable, or a result the chain does not show yet)."""
        started = time.monotonic()
        async with httpx.AsyncClient() as http:
            while (remaining := deadline - time.monotonic()) > 0:
                wait = max(1, min(WAIT_CHUNK, int(remaining)))
                try:
                    r = await http.get(f"{api_url}/jobs/{sub.call_id}/wait", params={"until": "result", "timeout": wait},
                                       timeout=wait + 10)
                except httpx.HTTPError:
                    return None
                if r.status_code == 408:
                    if progress:
                        progress(f"waiting for the result of call {sub.call_id} ({time.monotonic() - started:.0f}s)")
                    continue
                if r.status_code != 200:
                    return None
                entry: dict[str, Any] = r.json()
                if entry.get("status") == "failed" or not entry.get("result_tx"):
                    return Outcome(sub.call_id, None, None, entry)  # failed, or its result was dropped
                found = await self.results(sub.block_number)
                if sub.call_id not in found:
                    return None
                raw, tx, _ = found[sub.call_id]
                return Outcome(sub.call_id, decode_result("bool", raw), tx, None)
            return Outcome(sub.call_id, None, None, await _job_status(http, api_url, sub.call_id))


#: seconds one long-poll of ``/jobs/{call_id}/wait`` may last (progress is shown between them)
WAIT_CHUNK = 30


def iter_events(api_url: str, vm_id: str | None = None, *, last: int = 0) -> Iterator[dict[str, Any]]:
    """The query API's lifecycle events (``GET /events``), forever: the last ``last`` first, then live.
    A stream the server ends (it dropped a slow reader, or restarted) is resumed from the last event
    seen (``Last-Event-ID``); a server that cannot be reached raises :class:`ClientError`."""
    params: dict[str, Any] = {"last": last}
    if vm_id is not None:
        params["vm_id"] = vm_id
    headers: dict[str, str] = {}
    while True:
        try:
            with httpx.stream("GET", f"{api_url}/events", params=params, headers=headers,
                              timeout=httpx.Timeout(10, read=60)) as r:
                if r.status_code != 200:
                    r.read()
                    raise ClientError(f"GET /events: {r.status_code}: {r.text}")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        event: dict[str, Any] = json.loads(line[6:])
                        headers["Last-Event-ID"] = str(event["seq"])
                        yield event
        except httpx.HTTPError as exc:
            raise ClientError(f"event stream at {api_url} failed: {exc}") from exc


def wait_vm(api_url: str, vm_id: str, status: str, timeout: float) -> dict[str, Any]:
    """The VM's view once it is in ``status`` (``GET /vms/{id}/wait``, long-polls of at most 300 s);
    :class:`ClientError` on a timeout or any other answer."""
    from urllib.parse import quote

    deadline = time.monotonic() + timeout
    while True:
        wait = max(1, min(300, int(deadline - time.monotonic())))
        try:
            r = httpx.get(f"{api_url}/vms/{quote(vm_id, safe='')}/wait", params={"status": status, "timeout": wait},
                          timeout=wait + 10)
        except httpx.HTTPError as exc:
            raise ClientError(f"query API at {api_url} is unreachable: {exc}") from exc
        if r.status_code == 408 and deadline - time.monotonic() >= 1:
            continue
        body = r.json()
        if r.status_code != 200:
            raise ClientError(f"{r.status_code}: {body.get('error') if isinstance(body, dict) else body}")
        return body  # type: ignore[no-any-return]


async def _job_status(http: httpx.AsyncClient, api_url: str, call_id: int) -> dict[str, Any] | None:
    try:
        r = await http.get(f"{api_url}/jobs/{call_id}")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    body = r.json()
    return body if isinstance(body, dict) else None


def read_console(api_url: str, vm_id: str, tail: int, key: Secret[str] | None, *, at: int | None = None) -> str:
    """``GET /vms/{id}/console?tail=N``, signed with the customer's ``key`` (``Authorization: Tangle-Sig``,
    DESIGN.md §9; unsigned without a key, which a ``MICROVM_PUBLIC_CONSOLE`` operator answers). The
    signature covers the request target exactly as sent, so the URL is built here, not by httpx's params.
    :class:`ClientError` for any answer but 200 (a 401 says how to sign, or why the signature failed)."""
    from urllib.parse import quote

    from .tangle_sig import sign

    target = f"/vms/{quote(vm_id, safe='')}/console?tail={int(tail)}"
    headers: dict[str, str] = {}
    if key is not None:
        # the operator answers each signed request once (replays are refused) and a signature names its
        # second: a random nonce in the signed query makes two reads in one second two requests
        target += f"&nonce={os.urandom(8).hex()}"
        secret = key_from_hex(key.reveal()).secret.reveal()
        headers["Authorization"] = sign(secret, target, int(time.time()) if at is None else at)
    try:
        r = httpx.get(api_url.rstrip("/") + target, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise ClientError(f"query API at {api_url} is unreachable: {exc}") from exc
    if r.status_code == 200:
        return r.text
    try:
        body = r.json()
    except ValueError:
        body = r.text
    message = body.get("error") if isinstance(body, dict) else body
    hint = " (give the VM owner's key: --key-file or CUSTOMER_KEY)" if r.status_code == 401 and key is None else ""
    raise ClientError(f"{r.status_code}: {message}{hint}")
