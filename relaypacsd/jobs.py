"""The scheduled jobs of one generation (sweep, health probe, heartbeat, retention) on apscheduler."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from relaypacsd.config import Config

CLOCK_STEP = 5.0  # seconds by which wall and monotonic time may disagree over one main-loop tick (NTP slews far less)

Job = Callable[[], object]


class Jobs:
    """One generation's scheduler: its jobs started, watched, moved after a clock step, shut down."""

    def __init__(self) -> None:
        self.scheduler = BackgroundScheduler(timezone="UTC")

    @property
    def running(self) -> bool:
        return bool(self.scheduler.running)

    def start(self, config: Config, sweep: Job, probe: Job, heartbeat: Job, retention: Job) -> None:
        """Add the jobs by `config` and start; the probe's first run is at once."""
        d = config.delivery
        common = dict(coalesce=True, max_instances=1, replace_existing=True)
        self.scheduler.add_job(sweep, "interval", seconds=d.retry_sweep_interval, id="retry-sweep",
                               misfire_grace_time=max(1, int(d.retry_sweep_interval)), **common)
        self.scheduler.add_job(probe, "interval", seconds=d.health_interval, id="health-probe",
                               jitter=min(5, d.health_interval / 10), misfire_grace_time=max(1, int(d.health_interval)),
                               next_run_time=datetime.now(timezone.utc), **common)
        self.scheduler.add_job(heartbeat, "interval", seconds=config.daemon.heartbeat_interval,
                               id="heartbeat", misfire_grace_time=5, **common)
        # Always: the delivery history is pruned by it too (sent/ only when sent_retention_days is set).
        self.scheduler.add_job(retention, "interval", hours=1, id="retention", misfire_grace_time=600, **common)
        self.scheduler.add_listener(_job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self.scheduler.start()

    def follow_clock(self, last: tuple[float, float]) -> tuple[float, float]:
        """Detect a step of the wall clock since `last` (wall, monotonic) and run every scheduled job now.

        apscheduler 3 plans interval jobs by wall-clock datetimes: stepped back an hour, the sweep, the probe
        and the heartbeat would wait that hour (a PACS marked DOWN would stay DOWN). Returns the new (wall,
        monotonic)."""
        wall, mono = time.time(), time.monotonic()
        step = (wall - last[0]) - (mono - last[1])
        if abs(step) > CLOCK_STEP and self.scheduler.running:
            logger.warning("the system clock was stepped {} by {:.0f} s (NTP, a resumed VM?): scheduled jobs run "
                           "now and follow the new time; ages of waiting files are not affected",
                           "forward" if step > 0 else "back", abs(step))
            now = datetime.now(timezone.utc)
            for job in self.scheduler.get_jobs():
                self.scheduler.modify_job(job.id, next_run_time=now)
            self.scheduler.wakeup()
        return wall, mono

    def shutdown(self) -> None:
        """Stop, not waiting: a probe may hang on a PACS for its whole timeout (65 s by default); the engine
        ignores what it finds once stopping."""
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # not started
            pass


def _job_event(event: JobEvent) -> None:
    if event.code == EVENT_JOB_ERROR:
        logger.error("scheduled job {} failed: {}", event.job_id, getattr(event, "exception", ""))
    else:
        logger.warning("scheduled job {} skipped a run (still busy or late)", event.job_id)
