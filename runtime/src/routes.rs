//! Routing: which queue a task goes to when the sender names none (Celery's `task_routes`).
//!
//! Whoever publishes a task applies the routes: the client for what it sends, and the
//! worker for what it publishes to continue a workflow (a chain's next step, a chord's body,
//! callbacks) — as in Celery, where each process routes with its own app's configuration.
//! A signature's own `queue` option always wins over a route.

/// Celery's `task_routes`: task name or glob → queue. An exact name wins over globs; among
/// globs the longest pattern wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskRoutes(Vec<(String, String)>);

impl TaskRoutes {
    /// Routes from `(pattern, queue)` pairs.
    pub fn new(routes: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(crate::policy::most_specific_first(
            routes.into_iter().collect(),
        ))
    }

    /// The queue `task` is routed to, if a route matches.
    pub fn queue_for(&self, task: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(pattern, _)| crate::policy::glob_matches(pattern, task))
            .map(|(_, queue)| queue.as_str())
    }

    /// Where `task` goes: the queue the sender named, else its route, else `default`.
    pub fn resolve<'a>(&'a self, task: &str, named: Option<&'a str>, default: &'a str) -> &'a str {
        named.or_else(|| self.queue_for(task)).unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_queue_beats_a_route_which_beats_the_default() {
        let routes = TaskRoutes::new([
            ("math.*".to_owned(), "math".to_owned()),
            ("math.fib".to_owned(), "cpu".to_owned()),
        ]);
        assert_eq!(routes.resolve("math.fib", None, "celery"), "cpu");
        assert_eq!(routes.resolve("math.add", None, "celery"), "math");
        assert_eq!(routes.resolve("math.add", Some("mine"), "celery"), "mine");
        assert_eq!(routes.resolve("text.slugify", None, "celery"), "celery");
    }
}
