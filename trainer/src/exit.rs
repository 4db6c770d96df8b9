//! Exit codes of the `catapult` binary, decided from an error's chain: 2 for bad input
//! (recipes, arguments, paths, checkpoints that do not fit the recipe, a dataset that is
//! not there), 1 for failures at run time. The binary's `main` asks this module; nothing
//! else decides a code.

use catapult_checkpoints::ShardError;
use catapult_data::DataError;

/// Bad input: the user must change a recipe, an argument or a path.
pub const BAD_INPUT: u8 = 2;
/// A failure at run time (I/O, a peer, corruption); retrying may succeed.
pub const RUN_TIME: u8 = 1;

/// The exit code for `error`: `BAD_INPUT` when any error in its chain is bad input.
pub fn exit_code(error: &(dyn std::error::Error + 'static)) -> u8 {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        let bad = e.downcast_ref::<crate::RecipeError>().is_some()
            || e.downcast_ref::<crate::TrainError>()
                .is_some_and(crate::TrainError::is_bad_input)
            || e.downcast_ref::<DataError>().is_some_and(data_is_bad_input)
            || e.downcast_ref::<ShardError>().is_some_and(shard_is_bad_input);
        if bad {
            return BAD_INPUT;
        }
        next = e.source();
    }
    RUN_TIME
}

/// A dataset that is not there, has no usable column or tokenizer, or a data state that
/// does not fit the recipe; reading failures (I/O, a store, a broken parquet file) are
/// run time.
pub fn data_is_bad_input(e: &DataError) -> bool {
    match e {
        DataError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        DataError::Store { .. } | DataError::Parquet { .. } => false,
        _ => true,
    }
}

/// A location that holds no usable checkpoint; a corrupt one is run time (a fallback
/// may find an older one).
pub fn shard_is_bad_input(e: &ShardError) -> bool {
    match e {
        ShardError::Invalid { .. } => true,
        ShardError::Store(d) => data_is_bad_input(d),
        ShardError::Corrupt { .. } => false,
    }
}
