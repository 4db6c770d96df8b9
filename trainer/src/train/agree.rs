//! Agreement across ranks: every rank learns whether any rank failed, so none waits
//! forever in a collective for a rank that stopped.

use crate::error::TrainError;
use catapult_kernels::comm::Comm;

/// Makes every rank return an error when any rank's `result` is one (so no rank waits
/// forever in a collective for a rank that stopped); the error says whether a failed
/// rank's problem was bad input.
pub(super) fn agree<T>(comm: &Comm, result: Result<T, TrainError>) -> Result<T, TrainError> {
    let code = match &result {
        Ok(_) => 0,
        Err(e) if e.is_bad_input() => 2,
        Err(_) => 1,
    };
    let (codes, _) = comm.all_gather_v(&[code]);
    let failed: Vec<String> = (0..codes.len())
        .filter(|&r| codes[r] != 0)
        .map(|r| r.to_string())
        .collect();
    match result {
        Err(e) => Err(e),
        Ok(_) if !failed.is_empty() => Err(TrainError::Peer {
            ranks: failed.join(", "),
            bad_input: codes.contains(&2),
        }),
        ok => ok,
    }
}
