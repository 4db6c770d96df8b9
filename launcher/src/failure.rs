//! How a command's error becomes the process's exit code: 0 success, 1 a failure at run
//! time, 2 bad input. The library crates' errors are classified by
//! `catapult_trainer::exit_code` (it walks the error chain); bad input that only the
//! launcher can see (an argument that does not fit, a path named on the command line that
//! is missing or holds the wrong thing) is a `UsageError` somewhere in the chain.

use std::fmt;

/// A failure and the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = exit_code(&error);
        Self { code, error }
    }
}

/// 2 when the chain holds a `UsageError` or the library crates call it bad input, else 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.chain().any(|e| e.is::<UsageError>()) {
        catapult_trainer::exit::BAD_INPUT
    } else {
        catapult_trainer::exit_code(error.as_ref())
    }
}

impl Failure {
    /// The error line: each cause of the chain once (a cause whose text an outer
    /// message already quotes is not repeated).
    pub fn message(&self) -> String {
        let mut line = String::new();
        for cause in self.error.chain() {
            let text = cause.to_string();
            if line.contains(&text) {
                continue;
            }
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        line
    }
}

/// Bad input the launcher detects itself: what is wrong with which argument or path, and
/// what to do instead. Its message is printed as is (then its source, if any).
#[derive(Debug)]
pub struct UsageError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl UsageError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// `with_context` for bad input: the error becomes the source of a `UsageError` carrying
/// the message, so that it prints the same (`message: error`) and exits 2.
pub trait UsageContext<T> {
    fn usage_context<F: FnOnce() -> String>(self, message: F) -> Result<T, UsageError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> UsageContext<T> for Result<T, E> {
    fn usage_context<F: FnOnce() -> String>(self, message: F) -> Result<T, UsageError> {
        self.map_err(|e| UsageError {
            message: message(),
            source: Some(Box::new(e)),
        })
    }
}

impl<T> UsageContext<T> for Option<T> {
    fn usage_context<F: FnOnce() -> String>(self, message: F) -> Result<T, UsageError> {
        self.ok_or_else(|| UsageError::new(message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn usage_errors_exit_2_anywhere_in_the_chain_and_print_like_context() {
        let missing = std::fs::read("/nonexistent/catapult-test")
            .usage_context(|| "/nonexistent/catapult-test: cannot read".into());
        let error = anyhow::Error::from(missing.unwrap_err());
        assert_eq!(exit_code(&error), 2);
        let plain = std::fs::read("/nonexistent/catapult-test")
            .context("/nonexistent/catapult-test: cannot read")
            .unwrap_err();
        assert_eq!(format!("{error:#}"), format!("{plain:#}"));
        assert_eq!(exit_code(&plain), 1);
        let wrapped = error.context("outer");
        assert_eq!(exit_code(&wrapped), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("a rank died")), 1);
    }

    #[test]
    fn recipe_errors_exit_2() {
        let e = catapult_trainer::Override::parse("no-equals-sign").unwrap_err();
        assert_eq!(Failure::from(e).code, 2);
    }
}
