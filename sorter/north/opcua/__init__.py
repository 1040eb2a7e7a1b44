"""The line's own OPC UA server for SCADA/MES (docs/opcua-server.md), and its certificates.

proxy.py: LineOpcUaServer, what the service uses; protocol.py: the messages between the service and
the server process; process.py: the server process and its address space; security.py: users,
sessions and certificate checks, the only module reaching into asyncua's internals; pki.py:
certificates. Nothing is re-exported here: importing the package for pki.py (`sorter opcua certs`)
must not load asyncua.
"""
