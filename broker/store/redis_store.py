"""The distributed store: Redis or Valkey (`redis://HOST:PORT/DB`, `rediss://` for TLS).

Several brokers on several machines share one server (a primary; replicas and AOF for its own
durability, docs/operations.md). Every write is one server-side Lua script, so it is atomic on
the server and checks what it must there: the host's lease epoch for VM writes, the owner's
existing ID for allocations. Lease expiry uses the server's clock (TIME), never a broker's.
A single primary only: the scripts touch keys of several hosts, which Redis Cluster refuses.

Keys, under a prefix (`?prefix=`, default `hb:`): `policy:version` (counter), `policy:text` and
`policy:digest` (hashes by version); `vm:{key}:docs` (handler -> JSON), `vm:{key}:results`
(vcpu -> 8-byte seq + record); `host:{host}:vms` (vm_key -> registration); `lease:{host}`
(owner, epoch, expires in server ms); `ids:{pool}:by_id`, `ids:{pool}:by_owner`,
`ids:{pool}:next`.
"""

from __future__ import annotations

import struct
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from hyperbroker.broker.store import (
    MAX_ID,
    Fenced,
    Lease,
    StoreBatch,
    StoredPolicy,
    StoredVm,
    StoreUnavailable,
    StoreUrlError,
)

SEQ = struct.Struct("<Q")

# KEYS[1] the lease; KEYS[2..n] one key per operation. ARGV: owner, epoch, then three per
# operation: S (HSET field value), D (HDEL field), X (DEL the key).
_FENCED_WRITE = """
local lease = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then
  return redis.error_reply('FENCED lease epoch ' .. ARGV[2] .. ' is no longer current')
end
local a = 3
for k = 2, #KEYS do
  local op = ARGV[a]
  if op == 'S' then redis.call('HSET', KEYS[k], ARGV[a + 1], ARGV[a + 2])
  elseif op == 'D' then redis.call('HDEL', KEYS[k], ARGV[a + 1])
  else redis.call('DEL', KEYS[k]) end
  a = a + 3
end
return 1
"""

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS[1] the lease, KEYS[2] every lease by expiry. ARGV: owner, ttl ms, host. Returns the
# new epoch.
_TAKE_LEASE = _NOW_MS + """
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local expires = string.format('%d', now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires', expires)
redis.call('ZADD', KEYS[2], expires, ARGV[3])
return epoch
"""

# KEYS[1] the lease, KEYS[2] every lease by expiry. ARGV: owner, epoch, ttl ms (0: release,
# it lapses now; -1: drop, the host is gone), host. Returns 1 if the lease was current.
_RENEW_LEASE = _NOW_MS + """
local lease = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then return 0 end
local ttl = tonumber(ARGV[3])
local expires = string.format('%d', now + math.max(ttl, 0))
redis.call('HSET', KEYS[1], 'expires', expires)
if ttl < 0 then redis.call('ZREM', KEYS[2], ARGV[4])
else redis.call('ZADD', KEYS[2], expires, ARGV[4]) end
return 1
"""

# KEYS: version counter, texts, digests. ARGV: text, digest.
_ADD_POLICY = """
local latest = redis.call('GET', KEYS[1])
if latest and redis.call('HGET', KEYS[3], latest) == ARGV[2] then return tonumber(latest) end
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], v, ARGV[1])
redis.call('HSET', KEYS[3], v, ARGV[2])
return v
"""

# KEYS: by_id, by_owner, next. ARGV: owner, first, last. Returns the ID, or -1 when full.
_ALLOCATE = """
local have = redis.call('HGET', KEYS[2], ARGV[1])
if have then return tonumber(have) end
local first, last = tonumber(ARGV[2]), tonumber(ARGV[3])
local span = last - first + 1
local used = redis.call('HLEN', KEYS[1])
local start = tonumber(redis.call('GET', KEYS[3]) or first)
if start < first or start > last then start = first end
for i = 0, math.min(used, span - 1) do
  local c = string.format('%d', first + (start - first + i) % span)
  if redis.call('HSETNX', KEYS[1], c, ARGV[1]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[1], c)
    redis.call('SET', KEYS[3], string.format('%d', first + (tonumber(c) - first + 1) % span))
    return tonumber(c)
  end
end
return -1
"""

# KEYS: by_id, by_owner. ARGV: owner.
_RELEASE = """
local have = redis.call('HGET', KEYS[2], ARGV[1])
if have then
  redis.call('HDEL', KEYS[2], ARGV[1])
  if redis.call('HGET', KEYS[1], have) == ARGV[1] then redis.call('HDEL', KEYS[1], have) end
end
return 1
"""


class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "hb:") -> None:
        self._r = client
        self._p = prefix
        self._fenced_write = client.register_script(_FENCED_WRITE)
        self._take = client.register_script(_TAKE_LEASE)
        self._renew = client.register_script(_RENEW_LEASE)
        self._add_policy = client.register_script(_ADD_POLICY)
        self._allocate = client.register_script(_ALLOCATE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None,
                 timeout_s: float = 5.0) -> RedisStore:
        parts = urlsplit(url)
        if parts.password is not None:
            raise StoreUrlError("--store: a password in the URL would show in every process "
                                "list; give it with --store-password-file or "
                                "HYPERBROKER_STORE_PASSWORD")
        query = dict(parse_qsl(parts.query))
        prefix = query.pop("prefix", "hb:")
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            client = aioredis.Redis.from_url(
                clean, password=password, decode_responses=False,
                socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                health_check_interval=15)
        except ValueError as e:
            raise StoreUrlError(f"--store {url!r}: {e}") from None
        return cls(client, prefix)

    async def _run(self, coro: Any) -> Any:
        try:
            return await coro
        except ResponseError as e:
            if str(e).startswith("FENCED"):
                raise Fenced(str(e)) from None
            raise
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"redis: {e}") from e

    def _lease_key(self, host: str) -> str:
        return f"{self._p}lease:{host}"

    async def _write(self, lease: Lease, ops: list[tuple[str, str, str | bytes, str | bytes]]
                     ) -> None:
        keys = [self._lease_key(lease.host)]
        args: list[str | bytes | int] = [lease.owner, str(lease.epoch)]
        for op, key, fld, value in ops:
            keys.append(key)
            args += [op, fld, value]
        await self._run(self._fenced_write(keys=keys, args=args))

    # ---- policies --------------------------------------------------------------------------
    async def add_policy(self, text: str, digest: str) -> int:
        p = self._p
        return int(await self._run(self._add_policy(
            keys=[f"{p}policy:version", f"{p}policy:text", f"{p}policy:digest"],
            args=[text, digest])))

    async def get_policy(self, version: int) -> StoredPolicy | None:
        p = self._p
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(f"{p}policy:text", str(version))
        pipe.hget(f"{p}policy:digest", str(version))
        text, digest = await self._run(pipe.execute())
        if text is None or digest is None:
            return None
        return StoredPolicy(version, text.decode(), digest.decode())

    async def latest_policy(self) -> StoredPolicy | None:
        raw = await self._run(self._r.get(f"{self._p}policy:version"))
        return None if raw is None else await self.get_policy(int(raw))

    # ---- VMs -------------------------------------------------------------------------------
    async def load_vm(self, vm_key: str) -> StoredVm:
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(f"{self._p}vm:{vm_key}:docs")
        pipe.hgetall(f"{self._p}vm:{vm_key}:results")
        docs, results = await self._run(pipe.execute())
        return StoredVm(
            {h.decode(): d.decode() for h, d in docs.items()},
            {int(v): (SEQ.unpack_from(r)[0], bytes(r[SEQ.size:])) for v, r in results.items()})

    async def commit(self, lease: Lease, batch: StoreBatch) -> None:
        batch.check()
        p = self._p
        ops: list[tuple[str, str, str | bytes, str | bytes]] = []
        for (vm_key, handler), doc in batch.vm_state.items():
            key = f"{p}vm:{vm_key}:docs"
            ops.append(("D", key, handler, "") if doc is None else ("S", key, handler, doc))
        for (vm_key, vcpu), (seq, blob) in batch.last_results.items():
            ops.append(("S", f"{p}vm:{vm_key}:results", str(vcpu), SEQ.pack(seq) + blob))
        await self._write(lease, ops)

    async def put_vm(self, lease: Lease, vm_key: str, record: bytes) -> None:
        await self._write(lease, [("S", f"{self._p}host:{lease.host}:vms", vm_key, record)])

    async def host_vms(self, host: str) -> dict[str, bytes]:
        raw = await self._run(self._r.hgetall(f"{self._p}host:{host}:vms"))
        return {k.decode(): bytes(v) for k, v in raw.items()}

    async def forget_vm(self, lease: Lease, vm_key: str) -> None:
        p = self._p
        await self._write(lease, [("X", f"{p}vm:{vm_key}:docs", "", ""),
                                  ("X", f"{p}vm:{vm_key}:results", "", ""),
                                  ("D", f"{p}host:{lease.host}:vms", vm_key, "")])

    # ---- leases ----------------------------------------------------------------------------
    async def take_lease(self, host: str, owner: str, ttl_s: float) -> Lease:
        epoch = await self._run(self._take(keys=[self._lease_key(host), f"{self._p}leases"],
                                           args=[owner, int(ttl_s * 1000), host]))
        return Lease(host, owner, int(epoch))

    async def _set_expiry(self, lease: Lease, ttl_ms: int) -> bool:
        return bool(await self._run(self._renew(
            keys=[self._lease_key(lease.host), f"{self._p}leases"],
            args=[lease.owner, str(lease.epoch), ttl_ms, lease.host])))

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        return await self._set_expiry(lease, max(1, int(ttl_s * 1000)))

    async def release_lease(self, lease: Lease) -> None:
        await self._set_expiry(lease, 0)

    async def drop_lease(self, lease: Lease) -> None:
        await self._set_expiry(lease, -1)

    async def expired_leases(self, for_s: float) -> list[str]:
        seconds, micros = await self._run(self._r.time())
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        hosts = await self._run(self._r.zrangebyscore(f"{self._p}leases", "-inf",
                                                      now_ms - int(for_s * 1000)))
        return [h.decode() for h in hosts]

    # ---- ID pools --------------------------------------------------------------------------
    def _pool_keys(self, pool: str) -> list[str]:
        p = self._p
        return [f"{p}ids:{pool}:by_id", f"{p}ids:{pool}:by_owner", f"{p}ids:{pool}:next"]

    async def allocate_id(self, pool: str, owner: str, first: int, last: int) -> int | None:
        if not 0 <= first <= last <= MAX_ID:
            raise ValueError(f"ID range {first}..{last} is not within 0..{MAX_ID}")
        got = int(await self._run(self._allocate(keys=self._pool_keys(pool),
                                                 args=[owner, first, last])))
        return None if got < 0 else got

    async def release_id(self, pool: str, owner: str) -> None:
        await self._run(self._release(keys=self._pool_keys(pool)[:2], args=[owner]))

    async def id_owner(self, pool: str, id_: int) -> str | None:
        raw = await self._run(self._r.hget(self._pool_keys(pool)[0], str(id_)))
        return None if raw is None else raw.decode()

    async def close(self) -> None:
        await self._r.aclose()
