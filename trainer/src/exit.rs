//! Exit codes of the `catapult` binary, decided from an error's chain: 2 for bad input
//! (recipes, arguments, paths, checkpoints that do not fit the recipe, a dataset that is
//! not there), 1 for failures at run time. The binary's `main` asks this module; nothing
//! else decides a code.

use crate::error::{data_is_bad_input, shard_is_bad_input};
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
            || e.downcast_ref::<ShardError>()
                .is_some_and(shard_is_bad_input)
            || e.downcast_ref::<crate::export::ExportError>()
                .is_some_and(crate::export::ExportError::is_bad_input);
        if bad {
            return BAD_INPUT;
        }
        next = e.source();
    }
    RUN_TIME
}
