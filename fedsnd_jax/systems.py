"""Client systems on a simulated clock: each client's compute speed and bandwidth, and a round deadline.

Config section `systems` (off by default). Every client k has a profile — seconds per local step s_k, upload and
download bandwidth u_k, d_k in bits/s — drawn once per seed from log-normals (median and σ in the config, σ = 0:
every client alike), or read from a device-profile file in FedScale's format (`read_fedscale`). A sampled
client's round takes

  t_k = D_bits / d_k + τ_k · s_k + U_bits / u_k

for its τ_k local steps and the round's download and upload sizes (the metrics' bytes). The round lasts
max_k t_k, or until the deadline T (`deadline_s`, or `deadline_quantile` q: T = the q-quantile of the sampled
clients' t_k) when a client would run past it. A client that cannot finish by T is dropped (`stragglers=drop`:
its upload is lost, counted in `dropped_clients`) or uploads the local steps it finished,
⌊(T − D_bits/d_k − U_bits/u_k) / s_k⌋ of them (`stragglers=partial`, counted in `partial_clients`; none finished:
dropped). Partial work runs inside the cohort's one compiled client phase as masked steps. The metrics gain
`sim_time_s`, the cumulative simulated seconds, beside the real ones (`wall_s`).

Clients may be online only part of the time (`online_s`/`offline_s`: seeded exponential spells, `on_off`; or a
FedScale behaviour trace, `read_trace`): a round then starts at the first moment C clients are online
(`check_in`, the wait counted in `waited_s`) and samples among them. `buffer_size` > 0 replaces the rounds by
FedBuff's buffered asynchronous aggregation (`buffered.py`). The clock's time (and FedBuff's clients in flight)
is `ServerState.clock`.

With a deadline, only algorithms whose server reads just the uploads' weights and step counts run
(`AlgorithmSpec.partial_work`: fedavg, fedprox, fedntd, fednova, fedsnd and its ablations; FedSND leaves a
dropped client out of its teachers); FedNova is the one that corrects the
objective inconsistency of unequal work. The simulated profile drives the clock only: the real client code runs
as fast as the machine allows.
"""

import math
import os
import pickle
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsnd_jax.errors import InputError, require
from fedsnd_jax.rounds import AlgorithmInfo, Federation, MechanismParts, MechanismSpec

STRAGGLERS = ("drop", "partial")
SYSTEMS_STREAM = 0x5157  # the profiles' numpy stream beside the seed: independent of the run's JAX keys
# FedScale counts a training step as 3 forward passes (its "augmentation_factor": backward ≈ 2× forward) of a
# batch at the profile's per-sample inference milliseconds.
FEDSCALE_PASSES = 3.0


class Settings(NamedTuple):
  """Simulated client systems, config section `systems` (off unless enabled).

  Attributes:
    enabled: put the run on the simulated clock.
    step_s: median seconds of one local step (log-normal over the clients).
    step_sigma: σ of log(step_s) over the clients; 0 gives every client the median.
    up_mbps, down_mbps: median upload and download bandwidth, Mbit/s (log-normal over the clients).
    bandwidth_sigma: σ of log(bandwidth) over the clients (upload and download drawn independently).
    profile: a FedScale device-profile file (`read_fedscale`); replaces the log-normal draws.
    deadline_s: the round deadline in simulated seconds; 0: none.
    deadline_quantile: the deadline as this quantile of the sampled clients' round times, in (0, 1]; 0: none.
    stragglers: what a client that misses the deadline does, one of STRAGGLERS.
    online_s, offline_s: seeded availability: each client alternates online and offline spells of exponential
      length with these means (seconds); 0: always online.
    trace: a FedScale behaviour-trace file (`read_trace`); replaces the seeded availability.
    buffer_size: > 0 runs FedBuff, buffered asynchronous aggregation (`buffered.py`): the server steps every
      `buffer_size` arrivals; 0: synchronous rounds.
    concurrency: FedBuff's clients in flight (0: 2 × buffer_size).
    staleness_exponent: a: FedBuff weighs an update τ versions stale by (1 + τ)^−a (0.5: the paper's
      1/√(1 + τ); 0: constant).
  """

  enabled: bool = False
  step_s: float = 0.05
  step_sigma: float = 0.5
  up_mbps: float = 1.0
  down_mbps: float = 5.0
  bandwidth_sigma: float = 0.5
  profile: str = ""
  deadline_s: float = 0.0
  deadline_quantile: float = 0.0
  stragglers: str = "drop"
  online_s: float = 0.0
  offline_s: float = 0.0
  trace: str = ""
  buffer_size: int = 0
  concurrency: int = 0
  staleness_exponent: float = 0.5


class Profiles(NamedTuple):
  """Every client's systems: step_s [K] seconds per local step, up_bps [K] and down_bps [K] bits per second."""

  step_s: jax.Array
  up_bps: jax.Array
  down_bps: jax.Array


class Availability(NamedTuple):
  """When each client is online: the intervals [starts, ends] [K, M] seconds (padded with start +inf, end −inf)
  within its period [K], shifted by its phase [K]: client k is online at t when (t + phase_k) mod period_k lies
  in one of its intervals (FedScale's reading of a behaviour trace, which repeats after `finish_time`)."""

  starts: jax.Array
  ends: jax.Array
  period: jax.Array
  phase: jax.Array


class Clock(NamedTuple):
  """What the round driver's clock needs (`driver.timed`, `driver.fedbuff`): the profiles, the deadline
  (seconds, or the quantile of the sampled clients' times; 0: none), whether a straggler uploads partial work,
  when clients are online (None: always), and FedBuff's buffer (0: synchronous rounds), clients in flight and
  staleness exponent."""

  profiles: Profiles
  deadline_s: float = 0.0
  deadline_quantile: float = 0.0
  partial: bool = False
  availability: Availability | None = None
  buffer_size: int = 0
  concurrency: int = 0
  staleness_exponent: float = 0.5

  @property
  def deadline(self) -> bool:
    return self.deadline_s > 0 or self.deadline_quantile > 0


class ClockState(NamedTuple):
  """The simulated clock in `ServerState.clock`: time [] float32 simulated seconds since the run began, and
  FedBuff's clients in flight (`buffered.InFlight`; None for synchronous rounds)."""

  time: jax.Array
  flight: Any = None


class Timing(NamedTuple):
  """A round on the clock: steps [C] int32 the local steps each sampled client finishes (0: dropped), seconds []
  the round's simulated duration, dropped [] and partial [] int32 the clients that uploaded nothing or less than
  their schedule."""

  steps: jax.Array
  seconds: jax.Array
  dropped: jax.Array
  partial: jax.Array


def client_seconds(profiles: Profiles, steps, up_bits, down_bits):
  """(communication, whole round) seconds of clients with `profiles` taking `steps` local steps, each
  downloading `down_bits` and uploading `up_bits` (t_k of the module docstring)."""
  comm = down_bits / profiles.down_bps + up_bits / profiles.up_bps
  return comm, comm + steps * profiles.step_s


def round_timing(clock: Clock, ids, steps, up_bits, down_bits) -> Timing:
  """The round of the clients `ids` [C] with schedules of `steps` [C] local steps, each downloading
  `down_bits` and uploading `up_bits` (module docstring)."""
  p = jax.tree.map(lambda a: a[ids], clock.profiles)
  comm, full = client_seconds(p, steps, up_bits, down_bits)  # [C] each client's whole round
  if clock.deadline_s > 0:
    deadline = jnp.asarray(clock.deadline_s, jnp.float32)
  elif clock.deadline_quantile > 0:
    deadline = jnp.quantile(full, clock.deadline_quantile)
  else:
    deadline = jnp.asarray(jnp.inf, jnp.float32)
  on_time = full <= deadline
  if clock.partial:
    finished = jnp.floor(jnp.maximum(deadline - comm, 0.0) / p.step_s).astype(steps.dtype)
    done = jnp.where(on_time, steps, jnp.minimum(finished, steps))
  else:
    done = jnp.where(on_time, steps, 0)
  cut = steps > done
  return Timing(done, jnp.minimum(jnp.max(full), deadline), jnp.sum(cut & (done == 0)),
                jnp.sum(cut & (done > 0)))


def online(availability: Availability, t):
  """[K] bool: the clients online at simulated time t."""
  a = availability
  at = jnp.mod(t + a.phase, a.period)[:, None]
  return jnp.any((a.starts <= at) & (at <= a.ends), axis=1)


def _tolerance(t):
  """Seconds past an interval's start at which a check-in counts it: float32 rounding of t mod period would
  otherwise put the start itself just outside."""
  return 1e-3 + 2e-6 * jnp.abs(t)


def check_in(availability: Availability | None, t, eligible, need: int):
  """The earliest time t' ≥ t at which `need` of the `eligible` [K] clients are online, and [K] which are
  eligible and online then. It sweeps the intervals' starts in time order from t, for up to the longest period
  (each start counted a moment after it, `_tolerance`); if none has enough online (the traces never put that
  many online together), the clients are taken at t as if online."""
  if availability is None:
    return t, eligible
  a = availability
  enough = lambda c: jnp.sum(eligible & online(a, c)) >= need

  def next_start(c):
    """The first interval start after c (c itself excluded)."""
    shift = jnp.mod(a.starts - jnp.mod(c + a.phase, a.period)[:, None], a.period[:, None])
    shift = jnp.where(shift > _tolerance(c), shift, shift + a.period[:, None])
    return c + jnp.min(jnp.where(jnp.isfinite(a.starts), shift, jnp.inf))

  def sweep(c):
    start = next_start(c)
    return start + _tolerance(start)

  horizon = t + jnp.max(a.period)
  start = jax.lax.while_loop(lambda c: ~enough(c) & (c <= horizon), sweep, t)
  now = eligible & online(a, start)
  found = jnp.sum(now) >= need
  return jnp.where(found, start, t), jnp.where(found, now, eligible)


def on_off(s: Settings, num_clients: int, seed: int, spells: int = 32) -> Availability:
  """Seeded availability: every client alternates `spells` online and offline spells of exponential length
  (means online_s, offline_s), repeated after their sum, from a uniform phase."""
  rng = np.random.default_rng([seed, SYSTEMS_STREAM, 1])
  on = rng.exponential(s.online_s, (num_clients, spells))
  off = rng.exponential(s.offline_s, (num_clients, spells))
  ends = np.cumsum(on + off, axis=1) - off
  period = ends[:, -1] + off[:, -1]
  phase = rng.uniform(0, 1, num_clients) * period
  return Availability(*(jnp.asarray(x, jnp.float32) for x in (ends - on, ends, period, phase)))


def write_trace(path: str, active, inactive, finish_time) -> None:
  """Writes a FedScale behaviour-trace file: a pickled {client id (from 1): {"active": [times it comes online],
  "inactive": [times it goes offline], "finish_time": the trace's length, after which it repeats, "duration":
  the seconds online in it, "model": ""}}, times in seconds."""
  traces = {k + 1: {"active": [float(x) for x in a], "inactive": [float(x) for x in i], "finish_time": float(f),
                    "duration": float(sum(i) - sum(a)), "model": ""}
            for k, (a, i, f) in enumerate(zip(active, inactive, finish_time, strict=True))}
  with open(path, "wb") as f:
    pickle.dump(traces, f)


def read_trace(path: str, num_clients: int) -> Availability:
  """Availability from a FedScale behaviour-trace file (`write_trace`'s format, as FedScale's
  `client_behave_trace`): client k takes the file's (k mod n)-th entry in key order and is online from each
  `active` time to the `inactive` time of the same index, the trace repeating after `finish_time`.

  Raises:
    InputError: the file is missing or not of that format.
  """
  spans = _entries(path, "systems.trace", "FedScale behaviour-trace", lambda e: (
      np.asarray(e["active"], np.float64), np.asarray(e["inactive"], np.float64), float(e["finish_time"])))
  if not spans or not all(len(a) == len(i) > 0 and f > 0 and np.all(a <= i) for a, i, f in spans):
    raise InputError("systems.trace", f"{path}: needs at least one client, as many active as inactive times "
                     "(each active ≤ its inactive) and finish_time > 0")
  width = max(len(a) for a, _, _ in spans)
  starts = np.full((len(spans), width), np.inf)
  ends = np.full((len(spans), width), -np.inf)
  for k, (a, i, _) in enumerate(spans):
    starts[k, :len(a)], ends[k, :len(i)] = a, i
  pick = np.arange(num_clients) % len(spans)
  period = np.array([f for _, _, f in spans])[pick]
  return Availability(*(jnp.asarray(x, jnp.float32) for x in (starts[pick], ends[pick], period,
                                                             np.zeros(num_clients))))


def draw(s: Settings, num_clients: int, seed: int) -> Profiles:
  """Log-normal profiles of K clients, the same for a seed whatever else the run does."""
  rng = np.random.default_rng([seed, SYSTEMS_STREAM])

  def lognormal(median, sigma):
    return (median * np.exp(sigma * rng.standard_normal(num_clients))).astype(np.float32)

  step_s = lognormal(s.step_s, s.step_sigma)
  up = lognormal(s.up_mbps * 1e6, s.bandwidth_sigma)
  down = lognormal(s.down_mbps * 1e6, s.bandwidth_sigma)
  return Profiles(jnp.asarray(step_s), jnp.asarray(up), jnp.asarray(down))


class _PlainData(pickle.Unpickler):
  """Unpickles dicts, lists and numbers only: a profile file cannot run code."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"a device-profile file holds plain data only, not {module}.{name}")


def _entries(path: str, field: str, what: str, parse) -> list:
  """[parse(entry)] of a pickled {client id: entry} file, read as plain data, in key order.

  Raises:
    InputError: naming `field`, the file is missing or not of that format.
  """
  try:
    with open(path, "rb") as f:
      table = _PlainData(f).load()
    return [parse(table[k]) for k in sorted(table)]
  except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
    raise InputError(field, f"{path}: not a {what} file ({e})") from None


def write_fedscale(path: str, computation_ms, communication_kbps) -> None:
  """Writes a FedScale device-profile file: a pickled {client id (from 1): {"computation": per-sample
  inference milliseconds, "communication": bandwidth in kbit/s}}."""
  profiles = {k + 1: {"computation": float(c), "communication": float(b)}
              for k, (c, b) in enumerate(zip(computation_ms, communication_kbps, strict=True))}
  with open(path, "wb") as f:
    pickle.dump(profiles, f)


def read_fedscale(path: str, num_clients: int, batch_size: int) -> Profiles:
  """Profiles from a FedScale device-profile file (`write_fedscale`'s format, as FedScale's
  `client_device_capacity`). Client k takes the file's (k mod n)-th entry in key order, as FedScale reuses
  profiles when there are more clients than entries; a step costs FEDSCALE_PASSES × batch × the per-sample
  milliseconds, and the one bandwidth serves both directions.

  Raises:
    InputError: the file is missing or not of that format.
  """
  entries = _entries(path, "systems.profile", "FedScale device-profile",
                     lambda e: (float(e["computation"]), float(e["communication"])))
  computation, communication = np.array(entries, np.float32).reshape(-1, 2).T
  if not len(entries) or not (np.all(computation > 0) and np.all(communication > 0)):
    raise InputError("systems.profile", f"{path}: needs at least one client, every value > 0")
  pick = np.arange(num_clients) % len(entries)
  bps = communication[pick] * 1e3
  step_s = FEDSCALE_PASSES * batch_size * computation[pick] / 1e3
  return Profiles(jnp.asarray(step_s), jnp.asarray(bps), jnp.asarray(bps))


def enabled(s: Settings) -> bool:
  return s.enabled


def drops_clients(s: Settings) -> bool:
  """Whether a deadline may drop or cut the run's clients."""
  return s.enabled and (s.deadline_s > 0 or s.deadline_quantile > 0)


def validate(s: Settings, federation: Federation, algorithm: AlgorithmInfo) -> None:
  """Raises InputError naming `systems.<field>`."""
  for field in ("step_s", "up_mbps", "down_mbps"):
    value = getattr(s, field)
    require(math.isfinite(value) and value > 0, f"systems.{field}", f"must be > 0, got {value}")
  for field in ("step_sigma", "bandwidth_sigma", "deadline_s", "online_s", "offline_s", "staleness_exponent"):
    value = getattr(s, field)
    require(math.isfinite(value) and value >= 0, f"systems.{field}", f"must be ≥ 0, got {value}")
  require(0 <= s.deadline_quantile <= 1, "systems.deadline_quantile",
          f"must be in (0, 1], or 0 for none; got {s.deadline_quantile}")
  require(not (s.deadline_s > 0 and s.deadline_quantile > 0), "systems.deadline_quantile",
          "set systems.deadline_s or systems.deadline_quantile, not both")
  require(s.stragglers in STRAGGLERS, "systems.stragglers",
          f"unknown {s.stragglers!r}; allowed: {', '.join(STRAGGLERS)}")
  require(not s.profile or os.path.exists(s.profile), "systems.profile", f"{s.profile}: no such file")
  require(not s.trace or os.path.exists(s.trace), "systems.trace", f"{s.trace}: no such file")
  require((s.online_s > 0) == (s.offline_s > 0), "systems.offline_s",
          "seeded availability needs both systems.online_s and systems.offline_s > 0 (or both 0: always online)")
  require(not (s.trace and s.online_s), "systems.trace", "set systems.trace or systems.online_s, not both")
  require(s.enabled or not (s.deadline_s or s.deadline_quantile or s.profile or s.trace or s.online_s
                            or s.buffer_size), "systems.enabled",
          "a deadline, a profile or trace file, availability or a buffer needs systems.enabled=True")
  if drops_clients(s):
    require_partial_work(algorithm)
  if s.buffer_size:
    validate_buffer(s, federation, algorithm)
  for field in ("concurrency", "staleness_exponent"):  # FedBuff's own: said, not ignored, without a buffer
    require(s.buffer_size or getattr(s, field) == Settings._field_defaults[field], f"systems.{field}",
            "sets FedBuff, which is off: set systems.buffer_size > 0 too")


def validate_buffer(s: Settings, federation: Federation, algorithm: AlgorithmInfo) -> None:
  """FedBuff's settings, and the algorithms it runs."""
  require(s.buffer_size > 0, "systems.buffer_size", f"must be ≥ 0, got {s.buffer_size}")
  require(s.concurrency >= 0, "systems.concurrency", f"must be ≥ 0, got {s.concurrency}")
  concurrency = s.concurrency or 2 * s.buffer_size
  require(concurrency <= federation.num_clients, "systems.concurrency",
          f"{concurrency} clients in flight (0: 2 × buffer_size) need as many clients; num_clients is "
          f"{federation.num_clients}")
  require(not drops_clients(s), "systems.buffer_size", "FedBuff has no rounds to put a deadline on; set "
          "systems.deadline_s and systems.deadline_quantile to 0")
  require_asynchronous(algorithm)


def require_asynchronous(algorithm: AlgorithmInfo) -> None:
  """Refuses FedBuff for an algorithm whose state ties an update to the round it was sent in."""
  require(algorithm.asynchronous, "systems.buffer_size",
          f"{algorithm.name} keeps per-client or server state that ties an update to the round it was sent in "
          "(or normalises by the round's local work), so it cannot take stale uploads; use fedavg, fedprox, "
          "fedntd or fedsnd, or systems.buffer_size=0")


def require_partial_work(algorithm: AlgorithmInfo) -> None:
  """Refuses a deadline for an algorithm whose server would read a dropped client's untrained upload."""
  require(algorithm.partial_work, "systems.deadline_s",
          f"{algorithm.name}'s server reads every sampled client's model or keeps per-client state, so a deadline "
          "may not drop or cut its clients; use fedavg, fedprox, fedntd, fednova or fedsnd, or no deadline")


def build(s: Settings, federation: Federation, seed: int) -> MechanismParts:
  """The clock of the seed's profiles and availability."""
  k = federation.num_clients
  profiles = read_fedscale(s.profile, k, federation.schedule.batch_size) if s.profile else draw(s, k, seed)
  availability = read_trace(s.trace, k) if s.trace else on_off(s, k, seed) if s.online_s else None
  return MechanismParts(clock=Clock(profiles, s.deadline_s, s.deadline_quantile, s.stragglers == "partial",
                                    availability, s.buffer_size, s.concurrency or 2 * s.buffer_size,
                                    s.staleness_exponent))


SPEC = MechanismSpec("systems", Settings, enabled, validate, build)
