"""The parts of ``benchmarks/checkpoint_save.py``: workload, save rows, loops, memory, report.

``checkpoint_save.py`` is the entry point (``python benchmarks/checkpoint_save.py``
puts ``benchmarks/`` on ``sys.path``, so this package imports as
``checkpoint_bench``). Each module holds one concept:

- ``workload``: the seeded MLP + AdamW, its batches, device syncs;
- ``savers``: one class per table row, all with the same small interface;
- ``timing``: isolated saves and the training loops with and without saves;
- ``memory``: extra peak host memory per save, one fresh subprocess per row;
- ``report``: the markdown tables and the acceptance ratios.
"""
