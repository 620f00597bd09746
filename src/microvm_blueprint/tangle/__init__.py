"""The parts of Tangle's Rust blueprint-sdk an operator needs, ported to Python.

Never imports ``microvm_blueprint.runtime`` or ``microvm_blueprint.blueprint``.
"""
