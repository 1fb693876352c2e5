"""Flower (>= 1.42, Message API) apps for FedSVD and its control arms: ``client_app.app``,
``server_app.app`` (deployment, settings from the run config) and :func:`simulation.run_federated`."""
