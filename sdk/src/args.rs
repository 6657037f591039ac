//! Binding Celery-style arguments to a task's parameters the way Python binds them, and
//! completing a retry's new arguments the way Celery's `Task.retry` does.
//!
//! A task's parameters, in order: positional-or-keyword ones, then optionally a catch-all
//! for extra positional arguments (`*args`, after which parameters are keyword-only), then
//! optionally a catch-all for extra keyword arguments (`**kwargs`). Wrong counts, unknown
//! keywords and duplicates are refused before any parameter is decoded, with the
//! `TypeError` text Python would give.
//!
//! Longer than 400 lines for one idea, binding arguments: about half of it is the unit
//! tests that pin Python's and Celery's rules.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::__private::TaskDef;
use crate::TaskError;
use crate::error::Retry;

/// Celery-style arguments being bound to a task's parameters.
pub struct Args {
    task: &'static str,
    def: &'static TaskDef,
    positional: Vec<Value>,
    keywords: Map<String, Value>,
}

/// The parameter list as Python writes it: `x, y, *args, flag, **kwargs`.
pub(crate) fn signature(def: &TaskDef) -> Vec<String> {
    let (positional, keyword_only) = def.params.split_at(def.positional.min(def.params.len()));
    let mut names: Vec<String> = positional.iter().map(|p| (*p).to_owned()).collect();
    if let Some(var_args) = def.var_args {
        names.push(format!("*{var_args}"));
    }
    names.extend(keyword_only.iter().map(|p| (*p).to_owned()));
    if let Some(var_kwargs) = def.var_kwargs {
        names.push(format!("**{var_kwargs}"));
    }
    names
}

impl Args {
    pub(crate) fn parse(
        def: &'static TaskDef,
        args_json: &str,
        kwargs_json: &str,
    ) -> Result<Self, TaskError> {
        let task = def.name;
        let positional: Vec<Value> = serde_json::from_str(args_json).map_err(|e| {
            TaskError::invalid_arguments(format!(
                "{task}: positional arguments must be a JSON array: {e}"
            ))
        })?;
        let keywords: Map<String, Value> = serde_json::from_str(kwargs_json).map_err(|e| {
            TaskError::invalid_arguments(format!(
                "{task}: keyword arguments must be a JSON object: {e}"
            ))
        })?;
        let accepts = def.positional;
        if positional.len() > accepts && def.var_args.is_none() {
            let names = &def.params[..accepts];
            return Err(TaskError::invalid_arguments(format!(
                "{task} takes {} positional argument{} ({}) but {} were given",
                accepts,
                if accepts == 1 { "" } else { "s" },
                names.join(", "),
                positional.len()
            )));
        }
        for key in keywords.keys() {
            match def.params.iter().position(|p| p == key) {
                None if def.var_kwargs.is_some() => {}
                None => {
                    return Err(TaskError::invalid_arguments(format!(
                        "{task} got an unexpected keyword argument `{key}` (parameters: {})",
                        signature(def).join(", ")
                    )));
                }
                Some(i) if i < accepts && i < positional.len() => {
                    return Err(TaskError::invalid_arguments(format!(
                        "{task} got multiple values for argument `{key}`"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(Self {
            task,
            def,
            positional,
            keywords,
        })
    }

    /// The argument for parameter `index` (named `name`): positionally when it may be
    /// given so, else by keyword. `None` when it was left out.
    fn given(&mut self, index: usize, name: &str) -> Option<Value> {
        match self.positional.get_mut(index) {
            Some(slot) if index < self.def.positional => Some(slot.take()),
            _ => self.keywords.remove(name),
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        value: Value,
        name: &str,
        ty: &str,
    ) -> Result<T, TaskError> {
        serde_json::from_value(value).map_err(|e| {
            TaskError::invalid_arguments(format!(
                "{}: argument `{name}` must be {ty}: {e}",
                self.task
            ))
        })
    }

    /// Takes parameter `index` (named `name`, of Rust type `ty`) from the positional
    /// arguments or the keywords. A left-out argument is fine only for types that accept
    /// null (`Option<T>`, `()`), which get their null value.
    pub fn take<T: DeserializeOwned>(
        &mut self,
        index: usize,
        name: &str,
        ty: &str,
    ) -> Result<T, TaskError> {
        match self.given(index, name) {
            Some(value) => self.decode(value, name, ty),
            None => serde_json::from_value(Value::Null).map_err(|_| {
                TaskError::invalid_arguments(format!(
                    "{} missing required argument `{name}` ({ty}); parameters: {}",
                    self.task,
                    signature(self.def).join(", ")
                ))
            }),
        }
    }

    /// Takes an `Option<Option<U>>` parameter: `None` when the argument was left out,
    /// `Some(value)` (an explicit JSON `null` included) when it was given.
    pub fn take_given<T: DeserializeOwned>(
        &mut self,
        index: usize,
        name: &str,
        ty: &str,
    ) -> Result<Option<T>, TaskError> {
        self.given(index, name)
            .map(|value| self.decode(value, name, ty))
            .transpose()
    }

    /// Takes the `*args` parameter: the positional arguments beyond the named ones, as a
    /// JSON array decoded into `T`.
    pub fn take_var_args<T: DeserializeOwned>(
        &mut self,
        name: &str,
        ty: &str,
    ) -> Result<T, TaskError> {
        let extra: Vec<Value> = self
            .positional
            .drain(self.def.positional.min(self.positional.len())..)
            .collect();
        self.decode(Value::Array(extra), &format!("*{name}"), ty)
    }

    /// Takes the `**kwargs` parameter: the keyword arguments naming no parameter, as a
    /// JSON object decoded into `T`. Taken after every named parameter.
    pub fn take_var_kwargs<T: DeserializeOwned>(
        &mut self,
        name: &str,
        ty: &str,
    ) -> Result<T, TaskError> {
        let extra = std::mem::take(&mut self.keywords);
        self.decode(Value::Object(extra), &format!("**{name}"), ty)
    }

    /// Called after every parameter was taken; nothing is left over by construction
    /// (parse checked counts and keyword names), kept as the one place to add checks.
    pub fn finish(self) -> Result<(), TaskError> {
        Ok(())
    }
}

/// Celery's `Task.retry` with only one of `args` and `kwargs`: the other one is derived
/// from this attempt's arguments, so the next attempt binds as the task author meant.
///
/// * New positional arguments keep this attempt's keywords, except those naming a
///   parameter the new positional arguments now fill.
/// * New keywords replace this attempt's keywords; one naming a parameter this attempt got
///   positionally replaces that positional argument instead.
///
/// Afterwards both are set, or neither (a retry with the same arguments).
pub(crate) fn complete_retry(def: &TaskDef, args_json: &str, kwargs_json: &str, retry: &mut Retry) {
    if retry.args.is_some() == retry.kwargs.is_some() {
        return;
    }
    let positional_names = &def.params[..def.positional.min(def.params.len())];
    if let Some(args) = &retry.args {
        let mut kwargs: Map<String, Value> = serde_json::from_str(kwargs_json).unwrap_or_default();
        for name in positional_names.iter().take(args.len()) {
            kwargs.remove(*name);
        }
        retry.kwargs = Some(kwargs);
    } else if let Some(kwargs) = &mut retry.kwargs {
        let mut args: Vec<Value> = serde_json::from_str(args_json).unwrap_or_default();
        // Python binds this attempt's positional arguments to names first; more than the
        // task takes (without `*args`) cannot bind, and Celery then keeps them as they are.
        if args.len() <= def.positional || def.var_args.is_some() {
            for (slot, name) in args.iter_mut().zip(positional_names) {
                if let Some(value) = kwargs.remove(*name) {
                    *slot = value;
                }
            }
        }
        retry.args = Some(args);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::__private::PolicyDef;
    use crate::TaskContext;

    fn never(_: &TaskContext, _: Args) -> Result<String, TaskError> {
        unreachable!("binding tests never call the task")
    }

    const fn def(
        params: &'static [&'static str],
        positional: usize,
        var_args: Option<&'static str>,
        var_kwargs: Option<&'static str>,
    ) -> TaskDef {
        TaskDef {
            name: "t.greet",
            doc: "",
            params,
            positional,
            var_args,
            var_kwargs,
            fuel: None,
            memory_bytes: None,
            timeout_ms: None,
            soft_timeout_ms: None,
            ignore_result: false,
            policy: PolicyDef {
                autoretry_for: &[],
                max_retries: None,
                default_retry_delay_ms: None,
                retry_backoff_ms: None,
                retry_backoff_max_ms: None,
                retry_jitter: None,
                rate_limit: None,
            },
            call: never,
        }
    }

    static GREET: TaskDef = def(&["name", "times", "suffix"], 3, None, None);

    fn bind(args: &str, kwargs: &str) -> Result<(String, u32, Option<String>), TaskError> {
        let mut args = Args::parse(&GREET, args, kwargs)?;
        let bound = (
            args.take(0, "name", "String")?,
            args.take(1, "times", "u32")?,
            args.take(2, "suffix", "Option<String>")?,
        );
        args.finish()?;
        Ok(bound)
    }

    #[test]
    fn positional_keyword_and_optional_parameters_bind() {
        assert_eq!(
            bind(r#"["a", 2, "!"]"#, "{}"),
            Ok(("a".into(), 2, Some("!".into())))
        );
        assert_eq!(
            bind(r#"["a"]"#, r#"{"times": 3}"#),
            Ok(("a".into(), 3, None))
        );
        assert_eq!(
            bind("[]", r#"{"suffix": "?", "name": "b", "times": 1}"#),
            Ok(("b".into(), 1, Some("?".into())))
        );
    }

    #[test]
    fn binding_errors_name_task_parameter_and_type() {
        let err = |args, kwargs| bind(args, kwargs).unwrap_err().to_string();
        assert_eq!(
            err(r#"["a", -1]"#, "{}"),
            "TypeError: t.greet: argument `times` must be u32: invalid value: integer `-1`, expected u32"
        );
        assert_eq!(
            err(r#"["a"]"#, "{}"),
            "TypeError: t.greet missing required argument `times` (u32); parameters: name, times, suffix"
        );
        assert_eq!(
            err(r#"["a", 1, "x", 4]"#, "{}"),
            "TypeError: t.greet takes 3 positional arguments (name, times, suffix) but 4 were given"
        );
    }

    /// `def f(first, *rest, flag=None, **extra)`.
    static VARIADIC: TaskDef = def(&["first", "flag"], 1, Some("rest"), Some("extra"));

    type Bound = (i64, Vec<Value>, Option<bool>, Map<String, Value>);

    fn bind_variadic(args: &str, kwargs: &str) -> Result<Bound, TaskError> {
        let mut args = Args::parse(&VARIADIC, args, kwargs)?;
        let bound = (
            args.take(0, "first", "i64")?,
            args.take_var_args("rest", "Vec<Value>")?,
            args.take(1, "flag", "Option<bool>")?,
            args.take_var_kwargs("extra", "Map<String,Value>")?,
        );
        args.finish()?;
        Ok(bound)
    }

    #[test]
    fn extra_arguments_go_to_the_catch_alls_and_later_parameters_are_keyword_only() {
        let object = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            bind_variadic("[1, 2, 3]", r#"{"flag": true, "colour": "red"}"#),
            Ok((
                1,
                vec![json!(2), json!(3)],
                Some(true),
                object(json!({"colour": "red"}))
            ))
        );
        assert_eq!(
            bind_variadic("[1]", "{}"),
            Ok((1, vec![], None, Map::new())),
            "empty catch-alls"
        );
        assert_eq!(
            bind_variadic("[]", r#"{"first": 0}"#),
            Ok((0, vec![], None, Map::new())),
            "the positional parameter by keyword"
        );
        assert_eq!(
            bind_variadic("[1, true]", "{}").unwrap().2,
            None,
            "a parameter after *rest is never filled positionally"
        );
        assert_eq!(
            bind_variadic("[1]", r#"{"first": 2}"#)
                .unwrap_err()
                .to_string(),
            "TypeError: t.greet got multiple values for argument `first`"
        );
        assert_eq!(
            bind_variadic("[]", "{}").unwrap_err().to_string(),
            "TypeError: t.greet missing required argument `first` (i64); parameters: first, *rest, flag, **extra"
        );
        assert_eq!(signature(&VARIADIC), ["first", "*rest", "flag", "**extra"]);
    }

    #[test]
    fn an_explicit_null_is_told_from_a_left_out_argument() {
        let given = |kwargs: &str| {
            let mut args = Args::parse(&GREET, r#"["a", 1]"#, kwargs).unwrap();
            args.take_given::<Option<String>>(2, "suffix", "Option<Option<String>>")
                .unwrap()
        };
        assert_eq!(given("{}"), None, "left out");
        assert_eq!(given(r#"{"suffix": null}"#), Some(None), "explicit None");
        assert_eq!(given(r#"{"suffix": "!"}"#), Some(Some("!".into())));
    }

    fn completed(
        def: &TaskDef,
        request: (&str, &str),
        args: Option<Value>,
        kwargs: Option<Value>,
    ) -> (Option<Value>, Option<Value>) {
        let mut retry = Retry {
            args: args.map(|a| a.as_array().unwrap().clone()),
            kwargs: kwargs.map(|k| k.as_object().unwrap().clone()),
            ..Retry::default()
        };
        complete_retry(def, request.0, request.1, &mut retry);
        (
            retry.args.map(Value::Array),
            retry.kwargs.map(Value::Object),
        )
    }

    /// Celery's own cases (`retry_with_args_after_kwargs`, `retry_with_kwargs_after_args`).
    #[test]
    fn a_retry_with_only_new_args_or_kwargs_completes_the_other_as_celery_does() {
        static FOO_BAR: TaskDef = def(&["foo", "bar", "label"], 3, None, None);
        assert_eq!(
            completed(
                &FOO_BAR,
                ("[]", r#"{"foo": 1, "bar": 2, "label": "kept"}"#),
                Some(json!([2, 3])),
                None
            ),
            (Some(json!([2, 3])), Some(json!({"label": "kept"})))
        );
        assert_eq!(
            completed(&FOO_BAR, ("[1, 2]", "{}"), None, Some(json!({"foo": 2}))),
            (Some(json!([2, 2])), Some(json!({})))
        );
        assert_eq!(
            completed(
                &FOO_BAR,
                ("[1, 2]", r#"{"label": "dropped"}"#),
                None,
                Some(json!({"label": "new"}))
            ),
            (Some(json!([1, 2])), Some(json!({"label": "new"}))),
            "new keywords replace the old ones"
        );
        assert_eq!(
            completed(&FOO_BAR, ("[1]", "{}"), None, None),
            (None, None),
            "same arguments"
        );
        assert_eq!(
            completed(
                &FOO_BAR,
                ("[1]", "{}"),
                Some(json!([5])),
                Some(json!({"bar": 6}))
            ),
            (Some(json!([5])), Some(json!({"bar": 6}))),
            "both given: as given"
        );
        assert_eq!(
            completed(
                &VARIADIC,
                ("[1, 2, 3]", "{}"),
                None,
                Some(json!({"first": 0}))
            ),
            (Some(json!([0, 2, 3])), Some(json!({}))),
            "*args keep their places"
        );
    }
}
