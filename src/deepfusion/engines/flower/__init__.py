"""The Flower engine: the same federation as engines/local.py as a Flower app (ServerApp + ClientApp).

    server_app.py   rounds, the server step (deepfusion.server), outputs
    client_app.py   one device per SuperNode (node.py, deepfusion.device)
    roster.py       which SuperNode is which device; setup of new nodes; bytes per message
    wire.py         our bytes in Flower records, message sizes, one exchange with a deadline, run config
    simulation.py   `deepfusion run --engine flower`: the app in Flower's Simulation Runtime
"""
