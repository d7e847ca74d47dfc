"""`ctrscale refresh`: a new day of logs → a candidate model → published only if no worse.

For each date D (with --from/--to: every date in order; a published date is skipped):

1. prepare: D's raw TSV → `dataset/day=YYYYMMDD` (partitions.py), unless a partition whose
   manifest verifies exists; the dataset's stored encoding keeps ids stable across days;
2. warm start from the model `latest` names (verified against its manifest, trained on the
   same encoding), or from scratch when there is none or with --from-scratch;
3. train on D (and the `refresh.window_days - 1` days before it) in `work/<date>/run`; a rerun
   after a crash resumes from its last checkpoint (restarts if the config changed);
4. evaluate candidate and published model on the same gate slice (`refresh.holdout`);
5. publish iff the candidate's metrics are finite, its AUC ≥ refresh.min_auc and ≥ the
   published AUC − refresh.auc_tolerance (registry.py: models/<date>, then `latest`);
   otherwise record it in rejected/<date>/ and keep `latest`.

Exit codes, for schedulers:
    0  every date published (or already published, or behind `latest` in a --from/--to replay)
    1  unexpected failure (a bug, a crashed training process, a full disk); a rerun resumes
    2  bad input or config: missing or corrupt raw day, encoding mismatch, invalid config,
       a single --date older than `latest`
    3  the gate rejected a candidate; `latest` is unchanged (see rejected/<date>/metrics.json)
    4  another refresh holds the registry's lock
A replay stops at the first date that fails with 1 or 2; rejected dates do not stop it. The
last line on stdout is a JSON summary; logs, with UTC timestamps, go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import date as Date
from datetime import timedelta
from pathlib import Path
from typing import Any

from ctrscale.config import Config, config_to_toml, load_config, save_config
from ctrscale.errors import CtrscaleError, ExitCode
from ctrscale.jobs.launch import run_evaluation, run_training
from ctrscale.jobs.partitions import encoding_fingerprint, ensure_partition
from ctrscale.jobs.registry import CONFIG, Registry
from ctrscale.jobs.remote_registry import RemoteRegistry
from ctrscale.locking import ExclusiveLock, describe_holder
from ctrscale.train import checkpoint
from ctrscale.train.checkpoint import resolve_checkpoint
from ctrscale.train.tracking import MlflowSink, child_runs_of

STATUS = {
    ExitCode.OK: "ok",
    ExitCode.UNEXPECTED: "failed",
    ExitCode.BAD_INPUT: "bad_input",
    ExitCode.REJECTED: "rejected",
    ExitCode.LOCKED: "locked",
    ExitCode.DIVERGED: "diverged",
}
LOCK_FILE = ".lock"

log = logging.getLogger("ctrscale.refresh")


@dataclass
class DayResult:
    date: str
    status: str  # published, already_published, behind_latest, rejected, bad_input, failed
    exit_code: ExitCode = ExitCode.OK
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"date": self.date, "status": self.status, **self.detail}


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reason: str


def gate(
    candidate: dict[str, Any], previous: dict[str, Any] | None, tolerance: float, min_auc: float
) -> GateDecision:
    """Whether the candidate may replace the published model (both scored on one slice)."""
    auc, logloss = candidate["auc"], candidate["logloss"]
    if not (math.isfinite(auc) and math.isfinite(logloss)):
        return GateDecision(False, f"candidate metrics not finite (AUC {auc}, LogLoss {logloss})")
    if auc < min_auc:
        return GateDecision(False, f"candidate AUC {auc:.5f} < refresh.min_auc {min_auc}")
    if previous is None:
        return GateDecision(True, f"no published model yet; AUC {auc:.5f} ≥ min_auc {min_auc}")
    if not math.isfinite(previous["auc"]):
        return GateDecision(True, f"the published model's AUC is {previous['auc']} on this slice")
    bar = previous["auc"] - tolerance
    verdict = "≥" if auc >= bar else "<"
    return GateDecision(
        auc >= bar,
        f"candidate AUC {auc:.5f} {verdict} published {previous['auc']:.5f} − tolerance "
        f"{tolerance} = {bar:.5f}",
    )


def _check_config(config: Config) -> None:
    owned = {
        "data.train": config.data.train,
        "data.eval": config.data.eval,
        "train.warm_start": config.train.warm_start,
    }
    given = [key for key, value in owned.items() if value]
    if given:
        raise CtrscaleError(
            f"{', '.join(given)}: set by the refresh job (from refresh.dataset and the "
            "registry); remove them from the config"
        )
    if config.refresh.holdout == "fraction" and config.data.holdout_fraction == 0:
        raise CtrscaleError("refresh.holdout=fraction needs data.holdout_fraction > 0")


def _with_data(config: Config, train: list[str], evaluation: list[str], warm: str | None) -> Config:
    derived = config.model_copy(deep=True)
    derived.data.train = train
    derived.data.eval = evaluation
    derived.train.warm_start = warm
    return derived


class RefreshJob:
    def __init__(self, config: Config, *, from_scratch: bool = False) -> None:
        _check_config(config)
        self.config = config
        self.refresh = config.refresh
        self.registry = Registry(config.refresh.registry)
        self.from_scratch = from_scratch

    def run(self, days: list[Date]) -> list[DayResult]:
        """Refresh `days` in order under the registry lock; raises `LockHeld` when taken."""
        lock_file = self.registry.root / LOCK_FILE
        with ExclusiveLock(lock_file, "another `ctrscale refresh` is using this registry") as lock:
            if lock.stale:
                log.warning(
                    "took over the lock left by %s, which is no longer running",
                    describe_holder(lock.stale),
                )
            self.registry.recover()
            results: list[DayResult] = []
            for day in days:
                results.append(self._run_day(day, replay=len(days) > 1))
                if results[-1].exit_code not in (ExitCode.OK, ExitCode.REJECTED):
                    break
            return results

    def _run_day(self, day: Date, *, replay: bool) -> DayResult:
        started = time.monotonic()
        try:
            result = self._refresh(day, replay=replay)
        except CtrscaleError as exc:
            log.error("%s: %s", day, exc)
            status = STATUS[exc.exit_code]
            result = DayResult(str(day), status, exc.exit_code, {"error": str(exc)})
        except Exception as exc:
            log.exception("%s: unexpected failure; a rerun resumes where this one stopped", day)
            error = f"{type(exc).__name__}: {exc}"
            result = DayResult(str(day), "failed", ExitCode.UNEXPECTED, {"error": error})
        result.detail["seconds"] = round(time.monotonic() - started, 1)
        log.info("%s: %s", day, result.status)
        return result

    def _refresh(self, day: Date, *, replay: bool) -> DayResult:
        date = day.isoformat()
        if self.registry.is_published(date):
            log.info("%s: already published in %s", date, self.registry.model_dir(date))
            self._publish_remote(date)  # a publish whose upload was interrupted completes
            return DayResult(date, "already_published")
        latest = self.registry.latest()
        if latest is not None and date < latest:
            problem = (
                f"{date} is older than the latest published model ({latest}); publishing it "
                "would move `latest` back in time"
            )
            if replay:
                log.warning("skipped: %s", problem)
                return DayResult(date, "behind_latest", detail={"latest": latest})
            raise CtrscaleError(problem)

        new_day, train_days, evaluation = self._prepare(day)
        encoding = encoding_fingerprint(self.refresh.dataset)
        if latest is not None:
            self.registry.verify(latest)  # it is both the baseline and the starting point
        warm = self._warm_start(latest, encoding)
        train_config = _with_data(self.config, train_days, evaluation, warm)

        work = self.registry.work_dir(date)
        run_dir = work / "run"
        tracker = self._tracker(date, work)
        with child_runs_of(tracker, f"train {date}"):
            training = self._train(train_config, work, run_dir)
        candidate_checkpoint = resolve_checkpoint(run_dir)

        gate_config = _with_data(train_config, [new_day], evaluation, None)
        candidate = self._evaluate(gate_config, work / "gate.toml", candidate_checkpoint)
        previous = None if latest is None else self._evaluate_published(latest, gate_config, work)
        decision = gate(candidate, previous, self.refresh.auc_tolerance, self.refresh.min_auc)
        log.info("%s: %s → %s", date, decision.reason, "publish" if decision.publish else "reject")

        record = {
            "date": date,
            "decision": {
                "publish": decision.publish,
                "reason": decision.reason,
                "auc_tolerance": self.refresh.auc_tolerance,
                "min_auc": self.refresh.min_auc,
            },
            "candidate": candidate,
            "previous": None if previous is None else {"date": latest, **previous},
            "gate_slice": {
                "holdout": self.refresh.holdout,
                "data": gate_config.data.model_dump(mode="json"),
            },
            "training": training,
            "warm_start": None if warm is None else latest,
            "data": {
                "dataset": str(Path(self.refresh.dataset).resolve()),
                "train": train_days,
                "encoding_sha256": encoding,
            },
        }
        detail = {
            "candidate_auc": candidate["auc"],
            "previous_auc": None if previous is None else previous["auc"],
            "reason": decision.reason,
        }
        if tracker is not None:
            gate_metrics = {
                "gate/candidate_auc": candidate["auc"],
                "gate/candidate_logloss": candidate["logloss"],
                "gate/publish": float(decision.publish),
            }
            if previous is not None:
                gate_metrics["gate/previous_auc"] = previous["auc"]
            tracker.scalars(0, gate_metrics)
            tracker.log_params({"gate.reason": decision.reason})
            tracker.finish(artifacts=())
        if decision.publish:
            model = self.registry.publish(date, candidate_checkpoint, work / "train.toml", record)
            self._publish_remote(date)
            shutil.rmtree(work)
            log.info("%s: published %s; latest = %s", date, model, date)
            return DayResult(date, "published", ExitCode.OK, {**detail, "model": str(model)})
        # The rejected checkpoint is not kept: it is reproducible, and days of them would fill
        # the disk; its metrics and config are.
        where = self.registry.reject(date, train_config, record)
        shutil.rmtree(work)
        return DayResult(date, "rejected", ExitCode.REJECTED, {**detail, "rejected": str(where)})

    def _publish_remote(self, date: str) -> None:
        """The published model also at refresh.publish_uri, if set (remote_registry.py)."""
        if self.refresh.publish_uri:
            remote = RemoteRegistry(self.refresh.publish_uri)
            remote.publish(date, self.registry.model_dir(date))

    def _tracker(self, date: str, work: Path) -> MlflowSink | None:
        """The day's MLflow run (the training run is its child), if tracking.mlflow_uri is
        set; a rerun of an interrupted day continues it."""
        tracking = self.config.tracking
        if not tracking.mlflow_uri:
            return None
        named = tracking.model_copy(update={"run_name": f"refresh {date}"})
        params = {"date": date, "registry": self.refresh.registry, **{
            f"refresh.{k}": v for k, v in self.refresh.model_dump(mode="json").items()
        }}  # fmt: skip
        return MlflowSink(named, work / "tracking", params)

    def _prepare(self, day: Date) -> tuple[str, list[str], list[str]]:
        """The new day's partition, the days to train on, the eval data (next day or none)."""
        new_day = ensure_partition(self.refresh, day, required=True)
        earlier = [
            ensure_partition(self.refresh, day - timedelta(back), required=False)
            for back in range(self.refresh.window_days - 1, 0, -1)
        ]
        train_days = [str(path) for path in [*earlier, new_day] if path is not None]
        evaluation = []
        if self.refresh.holdout == "next_day":
            evaluation = [str(ensure_partition(self.refresh, day + timedelta(1), required=True))]
        return str(new_day), train_days, evaluation

    def _warm_start(self, latest: str | None, encoding: str) -> str | None:
        if self.from_scratch or latest is None:
            log.info("training from scratch (%s)", "--from-scratch" if latest else "no model yet")
            return None
        trained_on = self.registry.metrics(latest)["data"]["encoding_sha256"]
        if trained_on != encoding:
            raise CtrscaleError(
                f"the published model {latest} was trained on data encoded differently from "
                f"{self.refresh.dataset} (metadata.json changed), so its ids mean other values; "
                "refresh with --from-scratch, or use the dataset it was trained on"
            )
        source = self.registry.checkpoint(latest)
        log.info("warm start from the published model %s (%s)", latest, source)
        return str(source)

    def _train(self, config: Config, work: Path, run_dir: Path) -> dict[str, Any]:
        config_file = work / "train.toml"
        if config_file.exists() and config_file.read_text() != config_to_toml(config):
            log.warning("%s: the config differs from the interrupted run's; starting over", work)
            shutil.rmtree(work)
        resume = (run_dir / "checkpoints" / checkpoint.LATEST).exists()
        if resume:
            log.info("resuming the interrupted training in %s", run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # killed before its first checkpoint
            log.info("training in %s on %s", run_dir, ", ".join(config.data.train))
        save_config(config, config_file)
        return run_training(config, config_file, run_dir, resume=resume, nproc=self.refresh.nproc)

    def _evaluate_published(self, latest: str, gate_config: Config, work: Path) -> dict[str, Any]:
        """The published model on the gate slice, with its own model settings (today's config
        may have changed them) and today's data and devices."""
        published = load_config(self.registry.model_dir(latest) / CONFIG)
        published = published.model_copy(
            update={"data": gate_config.data, "distributed": gate_config.distributed}
        )
        return self._evaluate(published, work / "previous.toml", self.registry.checkpoint(latest))

    def _evaluate(self, config: Config, config_file: Path, source: Path) -> dict[str, Any]:
        save_config(config, config_file)
        result = run_evaluation(config, config_file, source, nproc=self.refresh.nproc)
        log.info(
            "%s: AUC %.5f, LogLoss %.5f on %d rows",
            source,
            result["auc"],
            result["logloss"],
            result["rows"],
        )
        return result


def requested_days(on: str | None, first: str | None = None, last: str | None = None) -> list[Date]:
    """--date D, or every date of --from D1 --to D2 in order."""
    try:
        if on is not None:
            return [Date.fromisoformat(on)]
        if first is None or last is None:
            raise CtrscaleError("--from and --to go together")
        start, end = Date.fromisoformat(first), Date.fromisoformat(last)
    except ValueError as exc:
        raise CtrscaleError(f"dates are YYYY-MM-DD: {exc}") from None
    if end < start:
        raise CtrscaleError(f"--to {end} is before --from {start}")
    return [start + timedelta(offset) for offset in range((end - start).days + 1)]


def overall_exit_code(results: list[DayResult]) -> ExitCode:
    failed = [r.exit_code for r in results if r.exit_code not in (ExitCode.OK, ExitCode.REJECTED)]
    if failed:
        return failed[0]
    rejected = any(r.exit_code == ExitCode.REJECTED for r in results)
    return ExitCode.REJECTED if rejected else ExitCode.OK


def _configure_logging() -> None:
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s %(levelname)s refresh: %(message)s")
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_cli(args: argparse.Namespace) -> int:
    """`ctrscale refresh`: run, print one JSON summary line on stdout, return the exit code."""
    _configure_logging()
    started = time.monotonic()
    summary: dict[str, Any] = {"command": "refresh", "days": []}
    registry: Registry | None = None
    try:
        # Training progress and messages go to stderr; stdout carries only the summary.
        with contextlib.redirect_stdout(sys.stderr):
            days = requested_days(args.date, args.date_from, args.date_to)
            config = load_config(args.config, args.overrides)
            job = RefreshJob(config, from_scratch=args.from_scratch)
            registry = job.registry
            results = job.run(days)
        summary["days"] = [result.as_dict() for result in results]
        code = overall_exit_code(results)
    except CtrscaleError as exc:
        log.error("%s", exc)
        summary["error"] = str(exc)
        code = exc.exit_code
    except Exception as exc:
        log.exception("unexpected failure")
        summary["error"] = f"{type(exc).__name__}: {exc}"
        code = ExitCode.UNEXPECTED
    summary.update(
        status=STATUS[code],
        exit_code=int(code),
        registry=None if registry is None else str(registry.root),
        latest=None if registry is None else registry.latest(),
        seconds=round(time.monotonic() - started, 1),
    )
    print(json.dumps(summary), flush=True)
    return code
