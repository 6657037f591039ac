//! The autoscaler tested by simulation: a machine of a few cores runs tasks that each burn
//! some CPU and then wait (a host call, a sleep), cores shared equally among the tasks that
//! want one; every simulated second the autoscaler is sampled as the worker samples it.

use super::*;

const MIB: u64 = 1 << 20;
/// The simulation's step.
const STEP: f64 = 0.01;

/// A task's needs: CPU seconds, then seconds of waiting.
#[derive(Debug, Clone, Copy)]
struct Work {
    cpu: f64,
    wait: f64,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    cpu_left: f64,
    wait_left: f64,
}

/// A machine running one worker; `size` is either fixed or the autoscaler's.
struct Sim {
    cores: usize,
    /// CPU used by other processes (a local broker), 0–1 of the machine.
    others: f64,
    backlog: std::collections::VecDeque<Work>,
    running: Vec<Running>,
    done: usize,
    now: f64,
    scaler: Option<Autoscaler>,
    fixed: usize,
    memory_available: Option<f64>,
    task_memory: u64,
    /// The sizes after each second.
    sizes: Vec<usize>,
}

impl Sim {
    fn new(cores: usize, scaler: Option<Autoscaler>, fixed: usize) -> Self {
        Self {
            cores,
            others: 0.0,
            backlog: std::collections::VecDeque::new(),
            running: Vec::new(),
            done: 0,
            now: 0.0,
            scaler,
            fixed,
            memory_available: None,
            task_memory: 64 * MIB,
            sizes: Vec::new(),
        }
    }

    fn auto(cores: usize, policy: AutoscalePolicy) -> Self {
        Self::new(cores, Some(Autoscaler::new(policy)), 0)
    }

    fn queue(&mut self, n: usize, work: impl Fn(usize) -> Work) {
        self.backlog.extend((0..n).map(work));
    }

    fn size(&self) -> usize {
        self.scaler.as_ref().map_or(self.fixed, Autoscaler::current)
    }

    /// Runs for `seconds`, sampling the autoscaler every second.
    fn run(&mut self, seconds: f64) {
        let steps = (seconds / STEP).round() as usize;
        let per_second = (1.0 / STEP).round() as usize;
        let mut own_cpu = 0.0;
        for step in 1..=steps {
            while self.running.len() < self.size() {
                let Some(work) = self.backlog.pop_front() else {
                    break;
                };
                self.running.push(Running {
                    cpu_left: work.cpu,
                    wait_left: work.wait,
                });
            }
            // Cores shared equally among the tasks in their CPU phase.
            let wanting = self.running.iter().filter(|r| r.cpu_left > 0.0).count();
            let room = self.cores as f64 * (1.0 - self.others);
            let each = if wanting == 0 {
                0.0
            } else {
                (room / wanting as f64).min(1.0)
            };
            for task in &mut self.running {
                if task.cpu_left > 0.0 {
                    let used = (each * STEP).min(task.cpu_left);
                    task.cpu_left -= used;
                    own_cpu += used;
                } else {
                    task.wait_left -= STEP;
                }
            }
            let before = self.running.len();
            self.running
                .retain(|task| task.cpu_left > 1e-12 || task.wait_left > 1e-12);
            self.done += before - self.running.len();
            self.now += STEP;
            if step % per_second == 0 {
                let own = own_cpu / self.cores as f64;
                own_cpu = 0.0;
                let busy = self.running.len();
                let sample = Sample {
                    busy,
                    waiting: self.backlog.len().min(64),
                    memory_committed: busy as u64 * self.task_memory,
                    task_memory: self.task_memory,
                    cpu: Some(CpuSample {
                        cores: self.cores,
                        machine: (own + self.others).min(1.0),
                        own,
                    }),
                    memory_available: self.memory_available,
                    completed: Some(self.done as u64),
                };
                let now = Duration::from_secs_f64(self.now);
                if let Some(scaler) = &mut self.scaler {
                    scaler.decide(now, &sample);
                }
                self.sizes.push(self.size());
            }
        }
    }
}

fn policy(max: usize, min: usize) -> AutoscalePolicy {
    AutoscalePolicy {
        keepalive: Duration::from_secs(10),
        ..AutoscalePolicy::new(max, min)
    }
}

fn cpu_bound(_: usize) -> Work {
    Work {
        cpu: 0.05,
        wait: 0.0,
    }
}

fn sleeping(_: usize) -> Work {
    Work {
        cpu: 0.002,
        wait: 1.0,
    }
}

/// Half CPU-bound, half sleeping, interleaved.
fn mixed(i: usize) -> Work {
    if i.is_multiple_of(2) {
        cpu_bound(i)
    } else {
        sleeping(i)
    }
}

#[test]
fn cpu_bound_tasks_settle_near_the_cores() {
    let mut sim = Sim::auto(2, policy(16, 1));
    sim.queue(100_000, cpu_bound);
    sim.run(30.0);
    // At the cores; a trial doubling now and then (every keepalive) is undone, as it
    // finishes no more tasks.
    let settled = &sim.sizes[10..];
    assert!(settled.iter().all(|&size| size <= 4), "{:?}", sim.sizes);
    assert!(
        settled.iter().filter(|&&size| size == 2).count() * 4 >= settled.len() * 3,
        "{:?}",
        sim.sizes
    );
}

#[test]
fn sleeping_tasks_grow_to_the_maximum_within_seconds() {
    let mut sim = Sim::auto(2, policy(16, 1));
    sim.queue(100_000, sleeping);
    sim.run(8.0);
    assert_eq!(sim.size(), 16, "{:?}", sim.sizes);
    assert!(
        sim.sizes.windows(2).all(|w| w[0] <= w[1]),
        "it only grew: {:?}",
        sim.sizes
    );
}

#[test]
fn an_idle_worker_shrinks_to_the_minimum_only_after_the_keepalive() {
    let mut sim = Sim::auto(2, policy(16, 2));
    sim.queue(200, sleeping);
    sim.run(45.0);
    let top = sim
        .sizes
        .iter()
        .position(|&size| size == 16)
        .expect("grew to 16");
    let drained = sim
        .sizes
        .iter()
        .enumerate()
        .skip(top)
        .find(|&(_, &size)| size < 16)
        .map(|(at, _)| at)
        .unwrap_or_else(|| panic!("shrank: {:?}", sim.sizes));
    assert_eq!(sim.backlog.len() + sim.running.len(), 0);
    assert_eq!(sim.size(), 2, "back to the minimum: {:?}", sim.sizes);
    // 200 tasks of 1 s on 16 slots drain in about 13 s; nothing shrinks before the
    // keepalive (10 s) has passed since the last growth.
    assert!(drained >= top + 10, "{:?}", sim.sizes);
}

#[test]
fn a_mix_comes_within_ten_percent_of_the_best_fixed_size() {
    let throughput = |sim: &mut Sim| {
        sim.queue(100_000, mixed);
        sim.run(60.0);
        sim.done as f64 / 60.0
    };
    let fixed: Vec<(usize, f64)> = [1, 2, 4, 8, 16]
        .into_iter()
        .map(|n| (n, throughput(&mut Sim::new(2, None, n))))
        .collect();
    let best = fixed.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    let mut auto = Sim::auto(2, policy(16, 1));
    let auto_throughput = throughput(&mut auto);
    assert!(
        auto_throughput >= 0.9 * best,
        "auto {auto_throughput:.1}/s vs fixed {fixed:?}; sizes {:?}",
        auto.sizes
    );
}

#[test]
fn a_cpu_heavy_mix_comes_within_ten_percent_of_the_best_fixed_size() {
    // As `wasmq bench autoscale`: CPU-bound tasks of 55 ms and sleeps of 250 ms, FIFO, on
    // 2 cores. The CPU saturates well before the slots stop helping.
    let heavy = |i: usize| {
        if i.is_multiple_of(2) {
            Work {
                cpu: 0.055,
                wait: 0.0,
            }
        } else {
            Work {
                cpu: 0.001,
                wait: 0.25,
            }
        }
    };
    let throughput = |sim: &mut Sim| {
        sim.queue(100_000, heavy);
        sim.run(60.0);
        sim.done as f64 / 60.0
    };
    let fixed: Vec<(usize, f64)> = [1, 2, 4, 8, 16]
        .into_iter()
        .map(|n| (n, throughput(&mut Sim::new(2, None, n))))
        .collect();
    let best = fixed.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    let mut auto = Sim::auto(2, policy(16, 2));
    let auto_throughput = throughput(&mut auto);
    assert!(
        auto_throughput >= 0.9 * best,
        "auto {auto_throughput:.1}/s vs fixed {fixed:?}; sizes {:?}",
        auto.sizes
    );
}

#[test]
fn the_memory_budget_caps_the_size_whatever_waits() {
    let mut sim = Sim::auto(
        2,
        AutoscalePolicy {
            memory_budget: Some(256 * MIB),
            ..policy(16, 1)
        },
    );
    sim.queue(100_000, sleeping);
    sim.run(20.0);
    assert!(sim.sizes.iter().all(|&size| size <= 4), "{:?}", sim.sizes);
    assert_eq!(sim.size(), 4);
}

#[test]
fn a_budget_smaller_than_min_wins() {
    let mut scaler = Autoscaler::new(AutoscalePolicy {
        memory_budget: Some(128 * MIB),
        ..policy(16, 4)
    });
    let sample = Sample {
        busy: 4,
        task_memory: 64 * MIB,
        ..Sample::default()
    };
    let change = scaler.decide(Duration::from_secs(1), &sample).unwrap();
    assert_eq!((change.to, change.reason), (2, Reason::Memory));
}

#[test]
fn short_machine_memory_stops_growth_then_shrinks_by_a_quarter() {
    let mut sim = Sim::auto(2, policy(16, 1));
    sim.queue(100_000, sleeping);
    sim.run(10.0);
    assert_eq!(sim.size(), 16);
    sim.memory_available = Some(0.05);
    sim.run(2.0);
    assert_eq!(sim.size(), 16, "not before it lasted 3 s");
    sim.run(2.0);
    assert_eq!(sim.size(), 12);
    sim.run(30.0);
    assert_eq!(sim.size(), 1, "{:?}", sim.sizes);
}

#[test]
fn a_busy_local_broker_makes_cpu_bound_tasks_shrink() {
    let mut sim = Sim::auto(2, policy(16, 1));
    sim.queue(100_000, cpu_bound);
    sim.run(10.0);
    let before = sim.size();
    // Another process (the broker, say) now takes 60% of the machine: the worker's tasks
    // saturate what is left, and one slot finishes as many as two.
    sim.others = 0.6;
    sim.run(20.0);
    assert!(before >= 2, "{:?}", sim.sizes);
    // Down to 1; a trial growth now and then (every keepalive) is undone, as it finishes
    // no more tasks.
    let late = &sim.sizes[sim.sizes.len() - 15..];
    assert!(late.iter().all(|&size| size <= 2), "{:?}", sim.sizes);
    assert!(
        late.iter().filter(|&&size| size == 1).count() >= 10,
        "{:?}",
        sim.sizes
    );
}

#[test]
fn between_the_thresholds_the_size_holds() {
    let mut scaler = Autoscaler::new(policy(16, 1));
    let cpu = |machine: f64| {
        Some(CpuSample {
            cores: 2,
            machine,
            own: machine,
        })
    };
    // Sleeping slots: the per-slot share is learnt small, and it grows.
    for second in 1..=6 {
        scaler.decide(
            Duration::from_secs(second),
            &Sample {
                busy: scaler.current(),
                waiting: 50,
                cpu: cpu(0.01),
                ..Sample::default()
            },
        );
    }
    let grown = scaler.current();
    assert!(grown > 4, "{grown}");
    // Now at 90%: over cpu_high (no growth), under cpu_saturated (no shrink), for long.
    for second in 7..=60 {
        let change = scaler.decide(
            Duration::from_secs(second),
            &Sample {
                busy: grown,
                waiting: 50,
                cpu: cpu(0.9),
                ..Sample::default()
            },
        );
        assert_eq!(change, None, "at {second}s");
    }
}

#[test]
fn without_cpu_figures_it_follows_the_demand_like_celery() {
    let mut scaler = Autoscaler::new(policy(10, 2));
    let at = |s| Duration::from_secs(s);
    let demand = |busy, waiting| Sample {
        busy,
        waiting,
        ..Sample::default()
    };
    let up = scaler.decide(at(1), &demand(2, 5)).unwrap();
    assert_eq!((up.from, up.to, up.reason), (2, 7, Reason::Demand));
    assert_eq!(scaler.decide(at(2), &demand(7, 30)).unwrap().to, 10);
    assert_eq!(scaler.demand(), 37);
    assert_eq!(scaler.decide(at(5), &demand(3, 0)), None, "keepalive");
    let down = scaler.decide(at(12), &demand(3, 0)).unwrap();
    assert_eq!((down.to, down.reason), (3, Reason::Idle));
    let down = scaler.decide(at(23), &demand(0, 0)).unwrap();
    assert_eq!(down.to, 2, "never below min");
}

#[test]
fn new_bounds_clamp_the_size_at_once() {
    let mut scaler = Autoscaler::new(policy(10, 2));
    let busy = Sample {
        busy: 2,
        waiting: 20,
        ..Sample::default()
    };
    scaler.decide(Duration::from_secs(1), &busy);
    assert_eq!(scaler.current(), 10);
    let change = scaler.set_bounds(Duration::from_secs(2), 6, 3).unwrap();
    assert_eq!((change.to, change.reason), (6, Reason::Bounds));
    let change = scaler.set_bounds(Duration::from_secs(3), 12, 8).unwrap();
    assert_eq!(change.to, 8, "raised to the new min");
    assert_eq!(scaler.policy().max, 12);
    let change = scaler.set_bounds(Duration::from_secs(4), 12, 20).unwrap();
    assert_eq!(scaler.policy().min, 12, "min clamped to max");
    assert_eq!(change.to, 12);
}
