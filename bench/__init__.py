"""Tether's benchmark suite: every BENCH.md figure next to its raw limit and a peer.

Run ``python -m bench`` (all figures), ``python -m bench B2 B3`` (some) or
``python -m bench --quick`` (a smoke run). See ``bench/README.md``.
"""
