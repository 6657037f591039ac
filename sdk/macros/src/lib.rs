//! Procedural macros behind `wasmq-sdk`. Use them through the SDK (`#[wasmq_sdk::task]`);
//! this crate is an implementation detail and its output names only `::wasmq_sdk` paths.
//!
//! `#[task]` leaves the function untouched, so it stays an ordinary Rust function that unit
//! tests can call natively, and adds beside it a hidden braced struct of the same name (it
//! lives in the type namespace, the function in the value namespace) implementing
//! `wasmq_sdk::__private::Task`. `export_tasks!(add, mul)` then names those structs.
//!
//! Longer than 400 lines for one idea, the `#[task]` macro: parsing the attribute and the
//! signature, rejecting what cannot work with spanned errors, and generating the glue.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, Meta, Pat, ReturnType, Token, Type};

/// Turns a plain Rust function into a wasmq task. See the `wasmq-sdk` documentation.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item_fn = syn::parse_macro_input!(item as ItemFn);
    match expand(attr.into(), &item_fn) {
        Ok(tokens) => tokens.into(),
        Err(err) => {
            // Keep the function so the only errors the author sees are ours.
            let err = err.to_compile_error();
            let item_fn = without_helper_attributes(&item_fn);
            quote!(#item_fn #err).into()
        }
    }
}

/// The parameter attributes `#[task]` reads: they mark the catch-all parameters.
const ARGS_ATTRIBUTE: &str = "args";
const KWARGS_ATTRIBUTE: &str = "kwargs";

fn is_helper_attribute(attr: &syn::Attribute) -> bool {
    attr.path().is_ident(ARGS_ATTRIBUTE) || attr.path().is_ident(KWARGS_ATTRIBUTE)
}

/// The function as the author wrote it, minus `#[args]` and `#[kwargs]` (which only
/// `#[task]` understands), so it compiles and unit tests call it natively.
fn without_helper_attributes(item_fn: &ItemFn) -> ItemFn {
    let mut item_fn = item_fn.clone();
    for input in &mut item_fn.sig.inputs {
        if let FnArg::Typed(pat_type) = input {
            pat_type.attrs.retain(|attr| !is_helper_attribute(attr));
        }
    }
    item_fn
}

/// Which of the two catch-alls a parameter is, from its attribute.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CatchAll {
    Args,
    Kwargs,
}

fn catch_all(pat_type: &syn::PatType) -> syn::Result<Option<CatchAll>> {
    let mut found = None;
    for attr in pat_type.attrs.iter().filter(|a| is_helper_attribute(a)) {
        if !matches!(attr.meta, Meta::Path(_)) {
            return Err(syn::Error::new(
                attr.span(),
                "`#[args]` and `#[kwargs]` take no arguments",
            ));
        }
        if found.is_some() {
            return Err(syn::Error::new(
                attr.span(),
                "a parameter is `#[args]` or `#[kwargs]`, not both",
            ));
        }
        found = Some(if attr.path().is_ident(ARGS_ATTRIBUTE) {
            CatchAll::Args
        } else {
            CatchAll::Kwargs
        });
    }
    Ok(found)
}

/// True when `ty` is spelled `Option<Option<..>>`: a parameter that tells a left-out
/// argument from an explicit null.
fn is_nested_option(ty: &Type) -> bool {
    fn option_inner(ty: &Type) -> Option<&Type> {
        let Type::Path(p) = ty else { return None };
        let last = p.path.segments.last()?;
        if last.ident != "Option" {
            return None;
        }
        let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        match args.args.first()? {
            syn::GenericArgument::Type(inner) if args.args.len() == 1 => Some(inner),
            _ => None,
        }
    }
    option_inner(ty).and_then(option_inner).is_some()
}

/// Options given in `#[task(...)]`.
#[derive(Default)]
struct TaskOptions {
    name: Option<String>,
    fuel: Option<u64>,
    memory_bytes: Option<u64>,
    timeout_ms: Option<u64>,
    soft_timeout_ms: Option<u64>,
    ignore_result: bool,
    autoretry_for: Vec<String>,
    max_retries: Option<u32>,
    default_retry_delay_ms: Option<u64>,
    retry_backoff_ms: Option<u64>,
    retry_backoff_max_ms: Option<u64>,
    retry_jitter: Option<bool>,
    rate_limit: Option<String>,
}

/// Every option `#[task(...)]` accepts, for error messages.
const OPTION_NAMES: &str = "name, fuel, memory, time_limit (or timeout), soft_time_limit, \
     ignore_result, autoretry_for, max_retries, default_retry_delay, retry_backoff, \
     retry_backoff_max, retry_jitter or rate_limit";

/// Checks a Celery rate limit: `N/s`, `N/m`, `N/h` or `N` (per second), N > 0.
fn valid_rate_limit(text: &str) -> bool {
    let (number, unit) = text.split_once('/').unwrap_or((text, "s"));
    matches!(unit.trim(), "s" | "m" | "h")
        && number
            .trim()
            .parse::<f64>()
            .is_ok_and(|n| n.is_finite() && n > 0.0)
}

fn parse_options(attr: proc_macro2::TokenStream) -> syn::Result<TaskOptions> {
    let mut options = TaskOptions::default();
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    for meta in metas {
        let Meta::NameValue(nv) = &meta else {
            return Err(syn::Error::new(
                meta.span(),
                format!("expected `option = value` with option one of {OPTION_NAMES}"),
            ));
        };
        let key = nv
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        if key == "autoretry_for" {
            let Expr::Array(array) = &nv.value else {
                return Err(syn::Error::new(
                    nv.value.span(),
                    "expected a list of failure kinds, e.g. [\"ConnectionError\"]",
                ));
            };
            for element in &array.elems {
                match element {
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(s), ..
                    }) if !s.value().trim().is_empty() => options.autoretry_for.push(s.value()),
                    other => {
                        return Err(syn::Error::new(
                            other.span(),
                            "expected a failure kind as a string, e.g. \"ConnectionError\"",
                        ));
                    }
                }
            }
            continue;
        }
        let Expr::Lit(ExprLit { lit, .. }) = &nv.value else {
            return Err(syn::Error::new(nv.value.span(), "expected a literal"));
        };
        match (key.as_str(), lit) {
            ("name", Lit::Str(s)) => {
                let name = s.value();
                if name.is_empty() || name.chars().any(char::is_whitespace) {
                    return Err(syn::Error::new(
                        s.span(),
                        "a task name must be non-empty and contain no whitespace",
                    ));
                }
                options.name = Some(name);
            }
            ("fuel", Lit::Int(n)) => options.fuel = Some(n.base10_parse()?),
            ("memory", Lit::Str(s)) => {
                options.memory_bytes =
                    Some(parse_size(&s.value()).ok_or_else(|| {
                        syn::Error::new(s.span(), "expected a size like \"64MiB\"")
                    })?);
            }
            (key @ ("timeout" | "time_limit"), Lit::Str(s)) => {
                // Celery's `time_limit` is the hard limit wasmq has always called `timeout`:
                // one limit, two names.
                if options.timeout_ms.is_some() {
                    return Err(syn::Error::new(
                        nv.path.span(),
                        format!(
                            "`{key}`: the hard time limit is already set (`timeout` and `time_limit` are one option)"
                        ),
                    ));
                }
                options.timeout_ms = Some(parse_duration_ms(&s.value()).ok_or_else(|| {
                    syn::Error::new(s.span(), "expected a duration like \"2s\" or \"500ms\"")
                })?);
            }
            ("soft_time_limit", Lit::Str(s)) => {
                options.soft_timeout_ms = Some(parse_duration_ms(&s.value()).ok_or_else(|| {
                    syn::Error::new(s.span(), "expected a duration like \"2s\" or \"500ms\"")
                })?);
            }
            ("ignore_result", Lit::Bool(b)) => options.ignore_result = b.value,
            ("max_retries", Lit::Int(n)) => options.max_retries = Some(n.base10_parse()?),
            ("retry_jitter", Lit::Bool(b)) => options.retry_jitter = Some(b.value),
            (
                key @ ("default_retry_delay" | "retry_backoff" | "retry_backoff_max"),
                Lit::Str(s),
            ) => {
                let ms = parse_duration_ms(&s.value()).ok_or_else(|| {
                    syn::Error::new(s.span(), "expected a duration like \"2s\" or \"500ms\"")
                })?;
                match key {
                    "default_retry_delay" => options.default_retry_delay_ms = Some(ms),
                    "retry_backoff" => options.retry_backoff_ms = Some(ms),
                    _ => options.retry_backoff_max_ms = Some(ms),
                }
            }
            ("rate_limit", Lit::Str(s)) => {
                if !valid_rate_limit(&s.value()) {
                    return Err(syn::Error::new(
                        s.span(),
                        "expected a rate like \"100/s\", \"10/m\" or \"1/h\"",
                    ));
                }
                options.rate_limit = Some(s.value());
            }
            (
                "name"
                | "memory"
                | "timeout"
                | "time_limit"
                | "soft_time_limit"
                | "default_retry_delay"
                | "retry_backoff"
                | "retry_backoff_max"
                | "rate_limit",
                other,
            ) => {
                return Err(syn::Error::new(other.span(), "expected a string literal"));
            }
            ("retry_jitter" | "ignore_result", other) => {
                return Err(syn::Error::new(other.span(), "expected true or false"));
            }
            ("fuel" | "max_retries", other) => {
                return Err(syn::Error::new(other.span(), "expected an integer literal"));
            }
            _ => {
                return Err(syn::Error::new(
                    nv.path.span(),
                    format!("unknown task option `{key}`; expected {OPTION_NAMES}"),
                ));
            }
        }
    }
    if let (Some(hard), Some(soft)) = (options.timeout_ms, options.soft_timeout_ms)
        && soft > hard
    {
        // Celery refuses the same declaration (`soft_time_limit must be less than or equal
        // to time_limit`): the soft limit would never be seen.
        return Err(syn::Error::new(
            Span::call_site(),
            format!("soft_time_limit ({soft} ms) must not exceed time_limit ({hard} ms)"),
        ));
    }
    Ok(options)
}

/// Parses `64MiB`, `512KiB`, `1GiB`, `10MB`, `4096` (bytes).
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// Parses `500ms`, `2s`, `5m`, `1h`.
fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// True when `ty` is `&TaskContext` (any path ending in `TaskContext`, shared reference).
fn is_context_type(ty: &Type) -> bool {
    let Type::Reference(reference) = ty else {
        return false;
    };
    if reference.mutability.is_some() {
        return false;
    }
    matches!(&*reference.elem, Type::Path(p)
        if p.path.segments.last().is_some_and(|s| s.ident == "TaskContext"))
}

/// True when the return type is spelled `Result<..>` (any path ending in `Result`).
fn returns_result(output: &ReturnType) -> bool {
    match output {
        ReturnType::Default => false,
        ReturnType::Type(_, ty) => matches!(&**ty, Type::Path(p)
            if p.path.segments.last().is_some_and(|s| s.ident == "Result")),
    }
}

/// Rejects parameter types that cannot be deserialized from a JSON argument.
fn check_param_type(ty: &Type) -> syn::Result<()> {
    match ty {
        Type::Reference(r) => {
            let hint = match &*r.elem {
                Type::Path(p) if p.path.is_ident("str") => "; take `String` instead of `&str`",
                Type::Slice(_) => "; take `Vec<T>` instead of a slice",
                _ => "",
            };
            Err(syn::Error::new(
                ty.span(),
                format!(
                    "task parameters must be owned serde types{hint} (only the first parameter may be `ctx: &TaskContext`)"
                ),
            ))
        }
        Type::ImplTrait(_) => Err(syn::Error::new(
            ty.span(),
            "`impl Trait` parameters are not supported: use a concrete serde type",
        )),
        Type::BareFn(_) | Type::TraitObject(_) | Type::Never(_) | Type::Infer(_) => {
            Err(syn::Error::new(
                ty.span(),
                "task parameters must be serde-deserializable types",
            ))
        }
        _ => Ok(()),
    }
}

fn expand(
    attr: proc_macro2::TokenStream,
    item_fn: &ItemFn,
) -> syn::Result<proc_macro2::TokenStream> {
    let options = parse_options(attr)?;
    let sig = &item_fn.sig;
    if let Some(asyncness) = &sig.asyncness {
        return Err(syn::Error::new(
            asyncness.span(),
            "tasks cannot be `async`: a task runs to completion in its own sandbox",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(syn::Error::new(
            unsafety.span(),
            "tasks cannot be `unsafe fn`",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "tasks cannot be generic: the host calls them with concrete JSON types",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(syn::Error::new(variadic.span(), "tasks cannot be variadic"));
    }
    if let ReturnType::Type(_, ty) = &sig.output
        && matches!(&**ty, Type::ImplTrait(_))
    {
        return Err(syn::Error::new(
            ty.span(),
            "tasks cannot return `impl Trait`: return a concrete serde type",
        ));
    }

    let fn_name = &sig.ident;
    let mut takes_context = false;
    let mut bindings = Vec::new();
    let mut call_args = Vec::new();
    let mut param_names = Vec::new();
    let mut var_args: Option<String> = None;
    let mut var_kwargs: Option<String> = None;
    let mut positional: Option<usize> = None;
    for (position, input) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(pat_type) = input else {
            return Err(syn::Error::new(
                input.span(),
                "tasks are free functions: `self` is not supported",
            ));
        };
        let catch_all = catch_all(pat_type)?;
        if position == 0 && catch_all.is_none() && is_context_type(&pat_type.ty) {
            takes_context = true;
            continue;
        }
        if is_context_type(&pat_type.ty) {
            return Err(syn::Error::new(
                pat_type.ty.span(),
                "`&TaskContext` must be the first parameter",
            ));
        }
        check_param_type(&pat_type.ty)?;
        let Pat::Ident(pat_ident) = &*pat_type.pat else {
            return Err(syn::Error::new(
                pat_type.pat.span(),
                "task parameters must be plain names (they double as keyword-argument names)",
            ));
        };
        if var_kwargs.is_some() {
            return Err(syn::Error::new(
                pat_type.span(),
                "the `#[kwargs]` parameter must be the last one (as `**kwargs` in Python)",
            ));
        }
        let name = pat_ident.ident.to_string();
        let name = name.strip_prefix("r#").unwrap_or(&name).to_owned();
        let ty = &pat_type.ty;
        let var = format_ident!("__wasmq_arg_{}", call_args.len());
        let ty_text = quote!(#ty).to_string().replace(' ', "");
        let take = match catch_all {
            Some(CatchAll::Args) => {
                if var_args.is_some() {
                    return Err(syn::Error::new(
                        pat_type.span(),
                        "a task has at most one `#[args]` parameter",
                    ));
                }
                // Parameters after `#[args]` are keyword-only, as in Python.
                positional = Some(param_names.len());
                let take = quote!(take_var_args(#name, #ty_text));
                var_args = Some(name);
                take
            }
            Some(CatchAll::Kwargs) => {
                let take = quote!(take_var_kwargs(#name, #ty_text));
                var_kwargs = Some(name);
                take
            }
            None => {
                let index = param_names.len();
                param_names.push(name.clone());
                if is_nested_option(ty) {
                    // `Option<Option<T>>`: `take_given` decodes `Option<T>` and leaves the
                    // outer `None` for a left-out argument.
                    quote!(take_given(#index, #name, #ty_text))
                } else {
                    quote!(take(#index, #name, #ty_text))
                }
            }
        };
        bindings.push(quote_spanned! {ty.span()=>
            let #var: #ty = __args.#take?;
        });
        call_args.push(var);
    }
    let positional = positional.unwrap_or(param_names.len());
    let args = &call_args;
    let call = if takes_context {
        quote!(#fn_name(__ctx, #(#args),*))
    } else {
        quote!(#fn_name(#(#args),*))
    };
    let finish = if returns_result(&sig.output) {
        quote! {
            match #call {
                ::core::result::Result::Ok(value) => ::wasmq_sdk::__private::Output::into_json(value),
                ::core::result::Result::Err(error) => ::core::result::Result::Err(
                    ::core::convert::Into::<::wasmq_sdk::TaskError>::into(error),
                ),
            }
        }
    } else {
        quote! { ::wasmq_sdk::__private::Output::into_json(#call) }
    };

    let name_expr = match &options.name {
        Some(name) => quote!(#name),
        None => {
            let fn_text = fn_name.to_string();
            let fn_text = fn_text.strip_prefix("r#").unwrap_or(&fn_text).to_owned();
            quote!(::core::concat!(::core::env!("CARGO_CRATE_NAME"), ".", #fn_text))
        }
    };
    let doc = item_fn
        .attrs
        .iter()
        .filter_map(|attr| match &attr.meta {
            Meta::NameValue(nv) if nv.path.is_ident("doc") => match &nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) => Some(s.value().trim().to_owned()),
                _ => None,
            },
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned();
    let option_tokens = |value: Option<u64>| match value {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let fuel = option_tokens(options.fuel);
    let memory = option_tokens(options.memory_bytes);
    let timeout = option_tokens(options.timeout_ms);
    let soft_timeout = option_tokens(options.soft_timeout_ms);
    let ignore_result = options.ignore_result;
    let name_tokens = |value: Option<String>| match value {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let var_args = name_tokens(var_args);
    let var_kwargs = name_tokens(var_kwargs);
    let default_retry_delay = option_tokens(options.default_retry_delay_ms);
    let retry_backoff = option_tokens(options.retry_backoff_ms);
    let retry_backoff_max = option_tokens(options.retry_backoff_max_ms);
    let max_retries = match options.max_retries {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let retry_jitter = match options.retry_jitter {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let rate_limit = match &options.rate_limit {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let autoretry_for = &options.autoretry_for;
    let vis = &item_fn.vis;
    let ctx_param = if takes_context {
        quote!(__ctx)
    } else {
        quote!(_)
    };
    let struct_doc = format!("wasmq task descriptor for [`{fn_name}`](fn@{fn_name}).");
    let span = Span::call_site();
    let item_fn = without_helper_attributes(item_fn);
    Ok(quote_spanned! {span=>
        #item_fn

        #[doc = #struct_doc]
        #[allow(non_camel_case_types)]
        #vis struct #fn_name {}

        impl ::wasmq_sdk::__private::Task for #fn_name {
            const DEF: ::wasmq_sdk::__private::TaskDef = ::wasmq_sdk::__private::TaskDef {
                name: #name_expr,
                doc: #doc,
                params: &[#(#param_names),*],
                positional: #positional,
                var_args: #var_args,
                var_kwargs: #var_kwargs,
                fuel: #fuel,
                memory_bytes: #memory,
                timeout_ms: #timeout,
                soft_timeout_ms: #soft_timeout,
                ignore_result: #ignore_result,
                policy: ::wasmq_sdk::__private::PolicyDef {
                    autoretry_for: &[#(#autoretry_for),*],
                    max_retries: #max_retries,
                    default_retry_delay_ms: #default_retry_delay,
                    retry_backoff_ms: #retry_backoff,
                    retry_backoff_max_ms: #retry_backoff_max,
                    retry_jitter: #retry_jitter,
                    rate_limit: #rate_limit,
                },
                call: {
                    fn __wasmq_call(
                        #ctx_param: &::wasmq_sdk::TaskContext,
                        mut __args: ::wasmq_sdk::__private::Args,
                    ) -> ::core::result::Result<::std::string::String, ::wasmq_sdk::TaskError> {
                        #(#bindings)*
                        __args.finish()?;
                        #finish
                    }
                    __wasmq_call
                },
            };
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("10MB"), Some(10_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_duration_ms("2s"), Some(2000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("2"), None);
    }

    #[test]
    fn bad_signatures_are_spanned_errors() {
        let cases = [
            ("async fn f(a: i64) -> i64 { a }", "cannot be `async`"),
            ("fn f<T>(a: T) -> i64 { 0 }", "cannot be generic"),
            (
                "fn f(a: &str) -> i64 { 0 }",
                "take `String` instead of `&str`",
            ),
            (
                "fn f(a: i64, ctx: &TaskContext) -> i64 { 0 }",
                "must be the first parameter",
            ),
            ("fn f((a, b): (i64, i64)) -> i64 { 0 }", "plain names"),
            (
                "fn f(a: impl Into<i64>) -> i64 { 0 }",
                "`impl Trait` parameters",
            ),
        ];
        for (source, expected) in cases {
            let item: ItemFn = syn::parse_str(source).unwrap();
            let err = expand(quote!(), &item)
                .err()
                .unwrap_or_else(|| panic!("{source} accepted"));
            assert!(err.to_string().contains(expected), "{source}: {err}");
        }
        let item: ItemFn = syn::parse_str("fn f(a: i64) -> i64 { a }").unwrap();
        let err = expand(quote!(colour = "red"), &item).err().unwrap();
        assert!(err.to_string().contains("unknown task option `colour`"));
        let bad_options = [
            (quote!(rate_limit = "fast"), "expected a rate like"),
            (quote!(rate_limit = "0/s"), "expected a rate like"),
            (quote!(retry_backoff = "soon"), "expected a duration"),
            (quote!(autoretry_for = "ConnectionError"), "expected a list"),
            (quote!(autoretry_for = [1]), "expected a failure kind"),
            (quote!(retry_jitter = "yes"), "expected true or false"),
            (quote!(max_retries = "3"), "expected an integer"),
        ];
        for (attr, expected) in bad_options {
            let err = expand(attr.clone(), &item)
                .err()
                .unwrap_or_else(|| panic!("{attr} accepted"));
            assert!(err.to_string().contains(expected), "{attr}: {err}");
        }
        let options = parse_options(quote!(
            autoretry_for = ["ConnectionError", "TimeoutError"],
            max_retries = 5,
            retry_backoff = "1s",
            retry_backoff_max = "1m",
            retry_jitter = false,
            default_retry_delay = "30s",
            rate_limit = "10/m"
        ))
        .unwrap();
        assert_eq!(options.autoretry_for, ["ConnectionError", "TimeoutError"]);
        assert_eq!(options.max_retries, Some(5));
        assert_eq!(options.retry_backoff_ms, Some(1000));
        assert_eq!(options.retry_backoff_max_ms, Some(60_000));
        assert_eq!(options.retry_jitter, Some(false));
        assert_eq!(options.default_retry_delay_ms, Some(30_000));
        assert_eq!(options.rate_limit.as_deref(), Some("10/m"));
    }

    #[test]
    fn celery_declarations_parse_and_contradictions_are_refused() {
        let options = parse_options(quote!(
            time_limit = "60s",
            soft_time_limit = "45s",
            ignore_result = true
        ))
        .unwrap();
        assert_eq!(options.timeout_ms, Some(60_000));
        assert_eq!(options.soft_timeout_ms, Some(45_000));
        assert!(options.ignore_result);
        assert_eq!(
            parse_options(quote!(timeout = "2s")).unwrap().timeout_ms,
            Some(2000),
            "`timeout` is the same option"
        );
        let refused = [
            (quote!(timeout = "2s", time_limit = "3s"), "one option"),
            (
                quote!(time_limit = "1s", soft_time_limit = "2s"),
                "must not exceed time_limit",
            ),
            (quote!(ignore_result = "yes"), "expected true or false"),
            (quote!(soft_time_limit = 5), "expected a string literal"),
        ];
        for (attr, expected) in refused {
            let err = parse_options(attr.clone())
                .err()
                .unwrap_or_else(|| panic!("{attr} accepted"));
            assert!(err.to_string().contains(expected), "{attr}: {err}");
        }
    }

    #[test]
    fn catch_alls_and_nested_options_expand_to_their_bindings() {
        let item: ItemFn = syn::parse_str(
            "fn f(ctx: &TaskContext, a: i64, #[args] rest: Vec<Value>, flag: Option<Option<bool>>, #[kwargs] extra: Map<String, Value>) -> i64 { a }",
        )
        .unwrap();
        let expanded = expand(quote!(), &item).unwrap().to_string();
        for expected in [
            "positional : 1usize",
            "var_args : :: core :: option :: Option :: Some (\"rest\")",
            "var_kwargs : :: core :: option :: Option :: Some (\"extra\")",
            "take_var_args (\"rest\"",
            "take_given (1usize , \"flag\"",
            "take_var_kwargs (\"extra\"",
            "params : & [\"a\" , \"flag\"]",
        ] {
            assert!(expanded.contains(expected), "{expected} in {expanded}");
        }
        assert!(
            !expanded.contains("# [args]") && !expanded.contains("# [kwargs]"),
            "the helper attributes are removed from the function: {expanded}"
        );
        let misplaced = [
            (
                "fn f(#[kwargs] extra: Map<String, Value>, a: i64) -> i64 { a }",
                "must be the last one",
            ),
            (
                "fn f(#[args] a: Vec<i64>, #[args] b: Vec<i64>) -> i64 { 0 }",
                "at most one `#[args]`",
            ),
            (
                "fn f(#[args(x)] a: Vec<i64>) -> i64 { 0 }",
                "take no arguments",
            ),
        ];
        for (source, expected) in misplaced {
            let item: ItemFn = syn::parse_str(source).unwrap();
            let err = expand(quote!(), &item)
                .err()
                .unwrap_or_else(|| panic!("{source} accepted"));
            assert!(err.to_string().contains(expected), "{source}: {err}");
        }
    }
}
