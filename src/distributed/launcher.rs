//! Which rank of how many this process is, as its launcher says.

/// The rank and world size a launcher gave this process: Open MPI's
/// `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE` (`mpirun`), or torchrun's
/// `RANK`/`WORLD_SIZE`; `None` when neither is set, or set to something that is not a
/// rank of a world (a single process).
pub fn launcher_rank() -> Option<(usize, usize)> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    for (r, w) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("RANK", "WORLD_SIZE"),
    ] {
        if let (Some(rank), Some(world)) = (var(r), var(w)) {
            if rank < world {
                return Some((rank, world));
            }
        }
    }
    None
}

/// This process' index among the ranks on its machine (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK`, torchrun's `LOCAL_RANK`): the GPU a rank takes when
/// `--device cuda` names none.
pub fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse().ok()))
}
