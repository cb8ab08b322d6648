"""What a run leaves on disk: checkpoints, the trajectory, result files, labels files, exports."""
