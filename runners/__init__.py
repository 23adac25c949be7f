"""Stages that use a compiled graph: check, gradcheck, bench, train, eval, visualize, render, compare."""
