//! Exit codes of the `catapult` binary, decided from an error's chain: 2 for bad input
//! (recipes, arguments, paths, checkpoints that do not fit the recipe), 1 for failures
//! at run time. The binary's `main` asks this module; nothing else decides a code.

/// Bad input: the user must change a recipe, an argument or a path.
pub const BAD_INPUT: u8 = 2;
/// A failure at run time (I/O, a peer, corruption); retrying may succeed.
pub const RUN_TIME: u8 = 1;

/// The exit code for `error`: `BAD_INPUT` when any error in its chain is bad input.
pub fn exit_code(error: &(dyn std::error::Error + 'static)) -> u8 {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<crate::RecipeError>().is_some() {
            return BAD_INPUT;
        }
        if let Some(t) = e.downcast_ref::<crate::TrainError>() {
            if t.is_bad_input() {
                return BAD_INPUT;
            }
        }
        next = e.source();
    }
    RUN_TIME
}
