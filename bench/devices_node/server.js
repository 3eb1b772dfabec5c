// A simulated OPC-UA device for bench/pollers.py (--device node-opcua), the
// node-opcua counterpart of `python -m bench.devices opcua`:
//
//     node bench/devices_node/server.js --nodes 5000 --port 4840 [--max-nodes-per-read N]
//                                       [--max-notifications-per-publish N] [--pki DIR]
//
// N Double variables ns=2;i=1..N under the folder ns=2;s=Bench, security
// None, anonymous. Once a second (on the wall-clock second) every variable
// gets a new value with a fresh SourceTimestamp through setValueFromSource,
// the way a driver feeds a node-opcua server, so monitored items hear of it
// through the server's own machinery (value_changed for items that asked
// for sampling interval 0, the sampling timer for the others). Prints
// "READY <port> nodes=N setup_s=S" once it serves, and stops on
// SIGTERM/SIGINT. Bench only: nothing in the test suite uses it.
import os from "node:os";
import path from "node:path";
import process from "node:process";

import {
    DataType,
    MessageSecurityMode,
    nodesets,
    OPCUACertificateManager,
    OPCUAServer,
    SecurityPolicy,
    StatusCodes,
    Subscription,
    Variant,
} from "node-opcua";

function parseArgs(argv) {
    const a = { nodes: 5000, port: 4840, maxNodesPerRead: 0, maxNotificationsPerPublish: 0, pki: null };
    for (let i = 0; i < argv.length; i += 2) {
        const [k, v] = [argv[i], argv[i + 1]];
        if (k === "--nodes") a.nodes = Number(v);
        else if (k === "--port") a.port = Number(v);
        else if (k === "--max-nodes-per-read") a.maxNodesPerRead = Number(v);
        else if (k === "--max-notifications-per-publish") a.maxNotificationsPerPublish = Number(v);
        else if (k === "--pki") a.pki = v;
        else throw new Error(`unknown option ${k}`);
    }
    return a;
}

// stdout carries the READY line only (bench/pollers.py reads it, then never
// again): node-opcua's own log lines (console.log) go to stderr, the device log
const ready = (line) => process.stdout.write(`${line}\n`);
console.log = console.error;
console.info = console.error;

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const t0 = process.hrtime.bigint();
    // The most notifications one PublishResponse carries, whatever the client
    // asks (node-opcua's default: 1000; the rest go with the next Publish)
    if (args.maxNotificationsPerPublish) Subscription.maxNotificationPerPublishHighLimit = args.maxNotificationsPerPublish;
    const pki = args.pki || path.join(os.tmpdir(), `haltless-bench-node-opcua-${process.pid}`);
    // both PKIs under --pki (the bench's temp dir), none in ~/.config
    const certificateManager = new OPCUACertificateManager({ rootFolder: path.join(pki, "server"),
                                                             automaticallyAcceptUnknownCertificate: true });
    const userCertificateManager = new OPCUACertificateManager({ rootFolder: path.join(pki, "user") });
    const operationLimits = { maxMonitoredItemsPerCall: 1000 };
    if (args.maxNodesPerRead) operationLimits.maxNodesPerRead = args.maxNodesPerRead;
    const server = new OPCUAServer({
        port: args.port,
        host: "127.0.0.1",
        hostname: "127.0.0.1",
        resourcePath: "",
        nodeset_filename: [nodesets.standard],
        serverCertificateManager: certificateManager,
        userCertificateManager,
        securityModes: [MessageSecurityMode.None],
        securityPolicies: [SecurityPolicy.None],
        allowAnonymous: true,
        buildInfo: { productName: "haltless bench device (node-opcua)" },
        serverCapabilities: {
            maxSessions: 200,
            maxSubscriptions: 1000,
            maxSubscriptionsPerSession: 10,
            // every node of this device may be monitored by one subscription
            maxMonitoredItems: Math.max(1_000_000, 2 * args.nodes),
            maxMonitoredItemsPerSubscription: Math.max(20_000, args.nodes),
            operationLimits,
        },
    });
    await server.initialize();
    const addressSpace = server.engine.addressSpace;
    const ns = addressSpace.registerNamespace("urn:haltless:bench");
    if (ns.index !== 2) throw new Error(`namespace index ${ns.index}, expected 2`);
    const folder = ns.addFolder(addressSpace.rootFolder.objects, { nodeId: "s=Bench", browseName: "Bench" });
    const vars = new Array(args.nodes);
    for (let i = 1; i <= args.nodes; i++) {
        vars[i - 1] = ns.addVariable({
            componentOf: folder,
            nodeId: `i=${i}`,
            browseName: `N${i}`,
            dataType: "Double",
            // 0: a client that asks for sampling interval 0 gets every change
            // as it happens (exception-based), not a sampling timer per item
            minimumSamplingInterval: 0,
            value: { dataType: DataType.Double, value: i },
        });
    }
    await server.start();
    const setup = Number(process.hrtime.bigint() - t0) / 1e9;
    ready(`READY ${args.port} nodes=${args.nodes} setup_s=${setup.toFixed(1)}`);

    let k = 0;
    let timer = null;
    const tick = () => {
        k += 1;
        const now = new Date();
        const shift = k % 100;
        for (let i = 0; i < vars.length; i++) {
            vars[i].setValueFromSource(new Variant({ dataType: DataType.Double, value: i + shift }),
                                       StatusCodes.Good, now);
        }
        timer = setTimeout(tick, 1000 - (Date.now() % 1000));
    };
    timer = setTimeout(tick, 1000 - (Date.now() % 1000));

    let stopping = false;
    const stop = async () => {
        if (stopping) return;
        stopping = true;
        clearTimeout(timer);
        await server.shutdown(0);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((err) => {
    process.stderr.write(`${err.stack || err}\n`);
    process.exit(1);
});
