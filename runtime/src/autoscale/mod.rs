//! Adaptive concurrency: how many task slots a worker should use now, between a minimum and
//! a maximum (Celery's `--autoscale MAX,MIN`; `--concurrency auto`).
//!
//! [`Autoscaler`] is the decision, with no clock and no I/O: each [`Sample`] (tasks
//! running and waiting, the machine's CPU, the memory the running tasks may use) goes in
//! with the time it was taken, a slot count comes out, so it is tested by simulation.
//! [`machine`] reads the CPU and memory figures from `/proc`.
//!
//! The rules, with hysteresis between growing and shrinking:
//!
//! * **Bounds.** Never below `min`, never above `max`, and never more slots than the memory
//!   budget holds tasks at their memory limit (`budget / task memory`); the budget wins
//!   over `min`, since it is the promise the operator made to the machine.
//! * **Grow at once** to the demand (tasks running + tasks waiting for a slot, Celery's
//!   `qty`) when the CPU and the memory have room for it. CPU room is judged per slot:
//!   the share of a core a busy slot uses is learnt while the CPU is not saturated (a slot
//!   sleeping in a host call uses none), and the slots allowed are the cores left to the
//!   worker (under `cpu_high`, less what other processes use, a local broker included)
//!   divided by that share. So CPU-bound tasks settle near the number of cores, while
//!   tasks that mostly wait grow to the maximum, and a mix lands between.
//! * **Shrink when the machine is saturated**: once the CPU has been above
//!   `cpu_saturated` for `saturated_for`, down to what the CPU holds (the per-slot share
//!   then can only be under-estimated, so it shrinks a step at a time); once available
//!   memory has been under `memory_low` for `saturated_for`, by a quarter.
//! * **Shrink when idle** (Celery's keepalive): when the demand stayed below the current
//!   size for `keepalive`, down to the highest demand seen meanwhile (at least `min`).
//!
//! * **Try what the CPU rule refuses.** Aggregate CPU figures cannot tell a slot that
//!   sleeps in a host call beside a saturated CPU from one more CPU-bound task, so when
//!   tasks wait and the CPU rule says no, the size doubles on trial (when the
//!   finished-task count is known): kept if the tasks finished per second rise by 10 %
//!   within `trial`, undone otherwise, and not tried again for `keepalive`. A size a trial
//!   proved useful is not shrunk by the CPU rule.
//!
//! Growth needs the CPU under `cpu_high`, a shrink needs it over `cpu_saturated`, higher:
//! between the two the size holds, so it does not flap.

pub mod machine;

use std::time::Duration;

/// How an [`Autoscaler`] decides, with Celery's defaults where Celery has the knob.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalePolicy {
    /// Fewest slots. Default: 1.
    pub min: usize,
    /// Most slots (the worker's sandbox pool and slot runners are sized for it).
    pub max: usize,
    /// How long the demand must stay below the size before it shrinks (Celery's
    /// `AUTOSCALE_KEEPALIVE`). Default: 30 s.
    pub keepalive: Duration,
    /// The machine's CPU use (0–1, all cores) under which the worker may grow. Default:
    /// 0.85.
    pub cpu_high: f64,
    /// The machine's CPU use over which, sustained, it shrinks. Default: 0.95.
    pub cpu_saturated: f64,
    /// The machine's available memory (0–1 of its total) under which it stops growing and,
    /// sustained, shrinks. Default: 0.10.
    pub memory_low: f64,
    /// How long saturation must last before a shrink, and between shrinks. Default: 3 s.
    pub saturated_for: Duration,
    /// What the memory limits of the running tasks may add up to (none: no budget).
    pub memory_budget: Option<u64>,
    /// Whether the CPU is considered (false: the size follows the demand within the
    /// bounds and the memory, as Celery's autoscaler). Default: true.
    pub cpu_aware: bool,
    /// How long a trial growth runs before its throughput is judged. Default: 2 s.
    pub trial: Duration,
}

impl AutoscalePolicy {
    /// Celery's `--autoscale MAX,MIN` with the defaults above.
    pub fn new(max: usize, min: usize) -> Self {
        let max = max.max(1);
        Self {
            min: min.clamp(1, max),
            max,
            keepalive: Duration::from_secs(30),
            cpu_high: 0.85,
            cpu_saturated: 0.95,
            memory_low: 0.10,
            saturated_for: Duration::from_secs(3),
            memory_budget: None,
            cpu_aware: true,
            trial: Duration::from_secs(2),
        }
    }
}

impl AutoscalePolicy {
    /// `--concurrency auto` on this machine: 8 slots per CPU at most (8 to 64), one per CPU
    /// at least, and half the machine's memory as the budget (none when it is unknown).
    pub fn auto() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let max = (8 * cpus).clamp(8, 64);
        Self {
            memory_budget: machine::memory_total().map(|total| total / 2),
            ..Self::new(max, cpus.min(max))
        }
    }
}

/// The CPU over the last sampling interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSample {
    /// The machine's cores.
    pub cores: usize,
    /// The machine's busy share, 0–1 of all its cores.
    pub machine: f64,
    /// This process's share, 0–1 of all the machine's cores (part of `machine`).
    pub own: f64,
}

/// What the worker looks like now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// Tasks holding a slot.
    pub busy: usize,
    /// Tasks received and waiting for a slot.
    pub waiting: usize,
    /// The memory limits of the running tasks, added up.
    pub memory_committed: u64,
    /// The memory limit of a task (the largest in use, or the default), for the budget.
    pub task_memory: u64,
    /// The CPU, when known (none: the CPU is not considered).
    pub cpu: Option<CpuSample>,
    /// The machine's available memory, 0–1 of its total, when known.
    pub memory_available: Option<f64>,
    /// Tasks finished so far (a running count), when known: growth the CPU rule refuses
    /// is then tried, and kept only if the throughput shows it helped.
    pub completed: Option<u64>,
}

impl Sample {
    /// Celery's `qty`: tasks running or waiting.
    pub fn demand(&self) -> usize {
        self.busy.saturating_add(self.waiting)
    }
}

/// Why the size changed (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Tasks wait and the machine has room.
    Demand,
    /// The demand stayed lower for the keepalive.
    Idle,
    /// The CPU has been saturated.
    Cpu,
    /// The machine's memory has been short, or the memory budget holds fewer tasks.
    Memory,
    /// The bounds changed (remote control's `autoscale`).
    Bounds,
    /// A growth on trial: the CPU rule saw no room, the throughput will say.
    Trial,
    /// A trial growth that did not raise the throughput, undone.
    NoGain,
}

/// A change of size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The size before.
    pub from: usize,
    /// The size now.
    pub to: usize,
    /// Why.
    pub reason: Reason,
}

/// The share of a core a busy slot is assumed to use before anything is measured:
/// pessimistic, every task CPU-bound.
const INITIAL_SHARE: f64 = 1.0;
/// How fast the per-slot CPU share follows what is measured (exponential average).
const SHARE_SMOOTHING: f64 = 0.5;
/// The smallest per-slot share believed (a slot that sleeps still costs a little).
const MIN_SHARE: f64 = 0.02;
/// Tasks that must finish in a window for its throughput to be judged.
const MIN_JUDGED: u64 = 20;
/// The throughput gain a trial growth must show to be kept.
const GAIN: f64 = 0.10;

/// A growth on trial.
#[derive(Debug, Clone, Copy)]
struct Trial {
    /// The size before it.
    from: usize,
    /// Tasks finished per second at that size.
    rate_before: f64,
}

/// The decision: feed it [`Sample`]s in time order with [`decide`](Self::decide).
#[derive(Debug, Clone)]
pub struct Autoscaler {
    policy: AutoscalePolicy,
    current: usize,
    /// The share of a core one busy slot uses, learnt.
    share: f64,
    /// When the size last changed, and the highest demand seen since.
    changed_at: Duration,
    peak: usize,
    /// Since when the CPU, and the machine's memory, are saturated (none: they are not).
    cpu_saturated_since: Option<Duration>,
    memory_short_since: Option<Duration>,
    /// The last sample's demand (for `stats`: Celery's `qty`).
    demand: usize,
    /// Tasks finished, as of the last sample, and as of the last change (when known).
    completed: Option<u64>,
    completed_at_change: Option<u64>,
    /// The growth on trial, if any; no new trial before `no_trial_until`.
    trial: Option<Trial>,
    no_trial_until: Duration,
    /// The largest size a trial showed useful: the CPU rule does not shrink below it.
    proven: usize,
}

impl Autoscaler {
    /// An autoscaler starting at `policy.min` slots.
    pub fn new(policy: AutoscalePolicy) -> Self {
        Self {
            current: policy.min,
            policy,
            share: INITIAL_SHARE,
            changed_at: Duration::ZERO,
            peak: 0,
            cpu_saturated_since: None,
            memory_short_since: None,
            demand: 0,
            completed: None,
            completed_at_change: None,
            trial: None,
            no_trial_until: Duration::ZERO,
            proven: 0,
        }
    }

    /// Tasks finished per second since the last change, and how many, once `trial` has
    /// passed since it (none when the count is unknown).
    fn rate_since_change(&self, now: Duration) -> Option<(f64, u64)> {
        let elapsed = now.saturating_sub(self.changed_at);
        if elapsed < self.policy.trial || elapsed.is_zero() {
            return None;
        }
        let finished = self
            .completed?
            .saturating_sub(self.completed_at_change.unwrap_or(0));
        Some((finished as f64 / elapsed.as_secs_f64(), finished))
    }

    /// The size now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The demand in the last sample (Celery's `qty`).
    pub fn demand(&self) -> usize {
        self.demand
    }

    /// The policy in force.
    pub fn policy(&self) -> &AutoscalePolicy {
        &self.policy
    }

    /// The share of a core one busy slot is believed to use.
    pub fn cpu_share(&self) -> f64 {
        self.share
    }

    /// Changes the bounds (remote control's `autoscale`), clamping the size into them at
    /// `now`; `max` is at least 1 and `min` at most `max`.
    pub fn set_bounds(&mut self, now: Duration, max: usize, min: usize) -> Option<Change> {
        self.policy.max = max.max(1);
        self.policy.min = min.clamp(1, self.policy.max);
        let to = self.current.clamp(self.policy.min, self.policy.max);
        self.change(now, to, Reason::Bounds)
    }

    /// The most slots the memory budget holds.
    fn memory_cap(&self, sample: &Sample) -> usize {
        match self.policy.memory_budget {
            Some(budget) if sample.task_memory > 0 => {
                usize::try_from(budget / sample.task_memory).unwrap_or(usize::MAX)
            }
            _ => usize::MAX,
        }
        .max(1)
    }

    /// The slots the CPU holds: the cores left to the worker under `cpu_high`, over the
    /// share of a core one slot uses.
    fn cpu_cap(&self, cpu: &CpuSample) -> usize {
        let cores = cpu.cores.max(1) as f64;
        let others = (cpu.machine - cpu.own).max(0.0) * cores;
        let room = (cores * self.policy.cpu_high - others).max(1.0);
        let slots = (room / self.share).ceil();
        if slots >= self.policy.max as f64 {
            self.policy.max
        } else {
            (slots as usize).max(1)
        }
    }

    /// Takes in `sample`, taken at `now` (any monotonic origin), and returns the change of
    /// size it calls for, if any; [`current`](Self::current) is then the new size.
    pub fn decide(&mut self, now: Duration, sample: &Sample) -> Option<Change> {
        let policy = self.policy.clone();
        let demand = sample.demand();
        self.demand = demand;
        self.completed = sample.completed;
        if self.completed_at_change.is_none() {
            self.completed_at_change = sample.completed;
        }
        self.peak = self.peak.max(demand);
        let ceiling = policy.max.min(self.memory_cap(sample)).max(1);
        let floor = policy.min.min(ceiling);

        // The CPU: learn what one busy slot uses while the CPU has room (then nothing waits
        // for a core, so the measure is true); when saturated, the measure is a lower bound
        // (slots share the cores), which can only raise the belief.
        let mut cpu_cap = usize::MAX;
        let mut cpu_saturated = false;
        let cpu = sample.cpu.filter(|_| policy.cpu_aware);
        if let Some(cpu) = &cpu {
            if sample.busy > 0 {
                let measured =
                    (cpu.own * cpu.cores.max(1) as f64 / sample.busy as f64).clamp(MIN_SHARE, 1.0);
                if cpu.machine < policy.cpu_high {
                    self.share += SHARE_SMOOTHING * (measured - self.share);
                } else {
                    self.share = self.share.max(measured);
                }
            }
            cpu_saturated = cpu.machine >= policy.cpu_saturated;
            cpu_cap = self.cpu_cap(cpu);
        }
        let cpu_room = cpu.is_none_or(|cpu| cpu.machine < policy.cpu_high);
        self.cpu_saturated_since = if cpu_saturated {
            self.cpu_saturated_since.or(Some(now))
        } else {
            None
        };
        let memory_short = sample
            .memory_available
            .is_some_and(|available| available < policy.memory_low);
        self.memory_short_since = if memory_short {
            self.memory_short_since.or(Some(now))
        } else {
            None
        };
        let lasted = |since: Option<Duration>| {
            since.is_some_and(|since| now.saturating_sub(since) >= policy.saturated_for)
        };
        let current = self.current;

        // Out of bounds (a budget or bounds that changed): back in at once.
        if current > ceiling {
            return self.change(now, ceiling, Reason::Memory);
        }
        if current < floor {
            return self.change(now, floor, Reason::Bounds);
        }
        if lasted(self.memory_short_since) && current > floor {
            self.memory_short_since = Some(now);
            let to = current.saturating_sub((current / 4).max(1)).max(floor);
            return self.change(now, to, Reason::Memory);
        }
        // A growth on trial: judged by the throughput once enough tasks finished (or
        // kept when too few finish to tell, after four trial periods).
        if let Some(trial) = self.trial {
            // Not judged yet: nothing else changes meanwhile.
            let (rate, finished) = self.rate_since_change(now)?;
            let waited = now.saturating_sub(self.changed_at) >= policy.trial * 4;
            if finished < MIN_JUDGED && !waited {
                return None;
            }
            self.trial = None;
            if finished >= MIN_JUDGED && rate < trial.rate_before * (1.0 + GAIN) {
                self.no_trial_until = now + policy.keepalive;
                return self.change(now, trial.from.max(floor), Reason::NoGain);
            }
            self.proven = self.proven.max(current);
        }
        let cpu_floor = floor.max(self.proven.min(current));
        if lasted(self.cpu_saturated_since) && cpu_cap < current && current > cpu_floor {
            self.cpu_saturated_since = Some(now);
            return self.change(now, cpu_cap.max(cpu_floor), Reason::Cpu);
        }
        let budget_room = policy.memory_budget.is_none_or(|budget| {
            sample.memory_committed.saturating_add(sample.task_memory) <= budget
        });
        if demand > current && !memory_short && budget_room {
            let to = if cpu_room {
                demand.min(ceiling).min(cpu_cap.max(current))
            } else {
                current
            };
            if to > current {
                return self.change(now, to, Reason::Demand);
            }
            // The CPU rule sees no room, but more slots may still finish more tasks (slots
            // waiting in host calls beside CPU-bound ones): try twice as many, and keep
            // them only if the throughput rises.
            if now >= self.no_trial_until
                && let Some((rate, finished)) = self.rate_since_change(now)
                && finished >= MIN_JUDGED
            {
                let to = current.saturating_mul(2).min(demand).min(ceiling);
                if to > current {
                    self.trial = Some(Trial {
                        from: current,
                        rate_before: rate,
                    });
                    return self.change(now, to, Reason::Trial);
                }
            }
        }
        if now.saturating_sub(self.changed_at) >= policy.keepalive {
            if self.peak < current {
                self.proven = 0;
                return self.change(now, self.peak.max(floor), Reason::Idle);
            }
            // The size was needed: start a new window.
            self.changed_at = now;
            self.peak = demand;
        }
        None
    }

    fn change(&mut self, now: Duration, to: usize, reason: Reason) -> Option<Change> {
        let from = self.current;
        // A new keepalive window: the demand that made this change is not counted in it;
        // the throughput is measured afresh.
        self.changed_at = now;
        self.peak = 0;
        self.completed_at_change = self.completed;
        if to == from {
            return None;
        }
        self.current = to;
        Some(Change { from, to, reason })
    }
}

#[cfg(test)]
mod tests;
