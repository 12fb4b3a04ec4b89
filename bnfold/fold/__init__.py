"""The fold core: graph view, rules, weight math, engine and the decisions as data.

It imports nothing from ``bnfold.onnxio``, ``bnfold.verify`` or ``bnfold.cli``.
"""
