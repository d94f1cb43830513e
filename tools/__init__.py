"""Helpers shared by the checkout's own programs beside the package (bench/, experiments/); not in the wheel."""
