"""The Flower deployment runtime: fedlm's server loop in a Flower ServerApp, its client trainer in a ClientApp.

``messages`` turns tasks and updates into Flower records, ``runtime`` sends them over a ``Grid``, ``server_app`` and
``client_app`` are the two Flower apps, ``launch`` writes the app bundle and starts Flower's processes.
"""
