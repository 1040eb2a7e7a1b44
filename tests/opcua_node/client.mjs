#!/usr/bin/env node
// OPC UA test client built on node-opcua (deliberately NOT asyncua, which the line server uses).
//
// Reads one JSON "script" on stdin, runs its steps in order against one session and prints ONE JSON
// object on stdout. Everything node-opcua logs goes to stderr. Exit code 0 whenever a JSON answer was
// printed, including when the connection failed ({"connected": false, "error": "..."}); exit code 2 only
// for an unreadable script. See tests/nodeclient.py for the Python side and the script format.

// node-opcua logs with console.log: send all of that to stderr so stdout carries only our JSON answer.
const writeStdout = process.stdout.write.bind(process.stdout);
for (const name of ["log", "info", "debug", "warn"]) {
    console[name] = (...args) => console.error(...args);
}

import { mkdtempSync, readFileSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { createRequire } from "node:module";

const t0 = performance.now();
const since = (t) => Math.round((performance.now() - t)) / 1000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let answered = false;
function answer(obj, code = 0) {
    if (answered) return;
    answered = true;
    obj.elapsed = since(t0);
    writeStdout(JSON.stringify(obj) + "\n", () => process.exit(code));
}

function statusName(err) {
    // node-opcua errors carry the status code in various places; fall back on the first Bad... in the text.
    if (!err) return "Unknown";
    const sc = err.statusCode || err.response?.responseHeader?.serviceResult;
    if (sc && sc.name && sc.name !== "Good") return sc.name;
    const m = String(err.message || err).match(/\b(Bad[A-Za-z]+)\b/);
    return m ? m[1] : String(err.message || err).trim().split("\n")[0].replace(/\s+/g, " ");
}

async function readStdin() {
    const chunks = [];
    for await (const chunk of process.stdin) chunks.push(chunk);
    return Buffer.concat(chunks).toString("utf-8");
}

let script;
try {
    script = JSON.parse(await readStdin());
} catch (err) {
    answer({ connected: false, error: `bad script: ${err.message}` }, 2);
}

// On node 20, loading node-opcua-secure-channel runs a diagnostic that generates a 4096-bit RSA key (seconds of
// CPU, and it holds up process exit) only to warn that RSA PKCS#1 v1.5 *decryption* is disabled there
// (CVE-2023-46809). A client using Basic256Sha256 never decrypts with PKCS#1 v1.5 (RSA-OAEP; it only encrypts),
// so neutralise the diagnostic before the package loads. Harmless if the file moved: the check just runs.
try {
    const requireFromClient = createRequire(createRequire(import.meta.url).resolve("node-opcua-client"));
    const channelIndex = requireFromClient.resolve("node-opcua-secure-channel");
    const diagnostic = createRequire(channelIndex)(path.join(path.dirname(channelIndex), "verify_pcks1.js"));
    diagnostic.testRSAPKCS1V15_EncryptDecrypt = async () => {};
} catch (err) {
    console.error(`(PKCS#1 diagnostic not disabled: ${err.message})`);
}

const opcua = await import("node-opcua-client");
const { OPCUACertificateManager } = await import("node-opcua-certificate-manager");
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds, TimestampsToReturn,
    ClientSubscription, ClientMonitoredItem, DataType, VariantArrayType, Variant, NodeClass, BrowseDirection,
    constructEventFilter, resolveNodeId,
} = opcua;

// ---------------------------------------------------------------------------------------------- values

function int64ToNumber(v, dataType) {
    if (typeof v === "bigint") return Number(v);
    if (!Array.isArray(v) || v.length !== 2) return v;
    let [hi, lo] = v;
    if (dataType === DataType.Int64 && hi >= 0x80000000) hi -= 0x100000000;
    return hi * 4294967296 + lo;
}

function scalarToJson(v, dataType) {
    if (v === null || v === undefined) return null;
    if (dataType === DataType.Int64 || dataType === DataType.UInt64) return int64ToNumber(v, dataType);
    if (typeof v === "bigint") return Number(v);
    if (typeof v === "number") return Number.isFinite(v) ? v : String(v);
    if (typeof v === "string" || typeof v === "boolean") return v;
    if (v instanceof Date) return v.toISOString();
    if (Buffer.isBuffer(v)) return v.toString("base64");
    if (v instanceof Variant) return variantToJson(v);
    if (typeof v === "object") {
        if ("text" in v && "locale" in v) return v.text ?? null; // LocalizedText
        if ("name" in v && "namespaceIndex" in v) return v.name; // QualifiedName
        if ("identifierType" in v && "namespace" in v) return v.toString(); // NodeId / ExpandedNodeId
        if (typeof v.toJSON === "function") return v.toJSON();
        try {
            return JSON.parse(JSON.stringify(v));
        } catch {
            return String(v);
        }
    }
    return String(v);
}

function variantToJson(variant) {
    if (!variant) return null;
    if (variant.arrayType === VariantArrayType.Scalar) return scalarToJson(variant.value, variant.dataType);
    if (variant.value === null || variant.value === undefined) return null;
    return Array.from(variant.value, (x) => scalarToJson(x, variant.dataType));
}

function dataTypeFromNodeId(nodeId) {
    // Built-in types are ns=0;i=1..25; enumerations and other subtypes are sent as their base type,
    // which we do not look up here: enumerations are Int32, anything else falls back to inference.
    if (nodeId && nodeId.namespace === 0 && typeof nodeId.value === "number" && nodeId.value <= 25) {
        return nodeId.value;
    }
    if (nodeId && nodeId.namespace === 0 && nodeId.value === 29) return DataType.Int32; // Enumeration
    return null;
}

function toVariant(arg, dataType, valueRank) {
    if (arg && typeof arg === "object" && !Array.isArray(arg) && "type" in arg) {
        const dt = DataType[arg.type];
        if (dt === undefined) throw new Error(`unknown data type ${arg.type}`);
        return new Variant({
            dataType: dt,
            arrayType: Array.isArray(arg.value) ? VariantArrayType.Array : VariantArrayType.Scalar,
            value: arg.value,
        });
    }
    let dt = dataType;
    const sample = Array.isArray(arg) ? arg[0] : arg;
    if (dt === null || dt === undefined || dt === DataType.Variant || dt === DataType.Null) {
        if (typeof sample === "boolean") dt = DataType.Boolean;
        else if (typeof sample === "number") dt = Number.isInteger(sample) ? DataType.Int64 : DataType.Double;
        else dt = DataType.String;
    }
    const isArray = Array.isArray(arg) || (valueRank !== undefined && valueRank > 0);
    return new Variant({
        dataType: dt,
        arrayType: isArray ? VariantArrayType.Array : VariantArrayType.Scalar,
        value: arg,
    });
}

function sameValue(a, b) {
    return JSON.stringify(a) === JSON.stringify(b);
}

// ------------------------------------------------------------------------------------------- session

let session = null;
let nsIndex = null;
let subscription = null;
const background = [];

function qualify(element) {
    if (typeof element === "object" && element !== null) return { namespaceIndex: element.ns, name: element.name };
    const m = /^(\d+):(.*)$/.exec(element);
    if (m) return { namespaceIndex: Number(m[1]), name: m[2] };
    if (nsIndex === null) throw new Error(`path element ${element} needs a namespace ("namespace" in the script or "N:Name")`);
    return { namespaceIndex: nsIndex, name: element };
}

const nodeCache = new Map();
async function resolvePath(pathElements) {
    const elements = pathElements || [];
    const key = JSON.stringify(elements);
    if (nodeCache.has(key)) return nodeCache.get(key);
    const start = resolveNodeId("ObjectsFolder");
    if (elements.length === 0) return start;
    const browsePath = {
        startingNode: start,
        relativePath: {
            elements: elements.map((el) => ({
                referenceTypeId: resolveNodeId("HierarchicalReferences"),
                isInverse: false,
                includeSubtypes: true,
                targetName: qualify(el),
            })),
        },
    };
    const result = await session.translateBrowsePath(browsePath);
    if (result.statusCode.isNotGood() || !result.targets || result.targets.length === 0) {
        const err = new Error(`cannot resolve path ${elements.join("/")}: ${result.statusCode.name}`);
        err.statusName = result.statusCode.name;
        throw err;
    }
    const nodeId = result.targets[0].targetId;
    nodeCache.set(key, nodeId);
    return nodeId;
}

async function getSubscription() {
    if (subscription) return subscription;
    subscription = await session.createSubscription2({
        requestedPublishingInterval: script.publishingInterval ?? 100,
        requestedLifetimeCount: 600,
        requestedMaxKeepAliveCount: 20,
        maxNotificationsPerPublish: 10000,
        publishingEnabled: true,
        priority: 10,
    });
    return subscription;
}

async function monitor(itemToMonitor, parameters, onChange) {
    const sub = await getSubscription();
    const item = ClientMonitoredItem.create(sub, itemToMonitor, parameters, TimestampsToReturn.Both);
    item.on("changed", onChange);
    await new Promise((resolve, reject) => {
        item.once("initialized", resolve);
        item.once("err", (message) => reject(new Error(String(message))));
    });
    return item;
}

function dataValueToJson(dataValue, tStart) {
    return {
        value: variantToJson(dataValue.value),
        statusCode: dataValue.statusCode.name,
        sourceTimestamp: dataValue.sourceTimestamp ? dataValue.sourceTimestamp.toISOString() : null,
        t: since(tStart),
    };
}

// ---------------------------------------------------------------------------------------------- steps

async function stepBrowse(step) {
    const nodeId = await resolvePath(step.path);
    const references = [];
    let result = await session.browse({
        nodeId,
        browseDirection: BrowseDirection.Forward,
        referenceTypeId: resolveNodeId("HierarchicalReferences"),
        includeSubtypes: true,
        nodeClassMask: 0,
        resultMask: 63,
    });
    for (;;) {
        if (result.statusCode.isNotGood()) return { ok: false, statusCode: result.statusCode.name, error: result.statusCode.name };
        references.push(...(result.references || []));
        if (!result.continuationPoint || result.continuationPoint.length === 0) break;
        [result] = await session.browseNext([result.continuationPoint], false);
    }
    const refs = references.map((r) => ({
        browseName: r.browseName.name,
        ns: r.browseName.namespaceIndex,
        nodeClass: NodeClass[r.nodeClass],
        nodeId: r.nodeId.toString(),
    }));
    return {
        ok: true,
        nodeId: nodeId.toString(),
        children: refs.filter((r) => nsIndex === null || r.ns === nsIndex).map((r) => r.browseName),
        references: refs,
    };
}

async function stepRead(step) {
    const nodeId = await resolvePath(step.path);
    const attributeId = step.attribute ? AttributeIds[step.attribute] : AttributeIds.Value;
    const dataValue = await session.read({ nodeId, attributeId });
    return {
        ok: dataValue.statusCode.isGood(),
        nodeId: nodeId.toString(),
        value: variantToJson(dataValue.value),
        dataType: DataType[dataValue.value?.dataType] ?? null,
        statusCode: dataValue.statusCode.name,
        sourceTimestamp: dataValue.sourceTimestamp ? dataValue.sourceTimestamp.toISOString() : null,
    };
}

async function stepWrite(step) {
    const nodeId = await resolvePath(step.path);
    let dataType = step.type ? DataType[step.type] : null;
    if (dataType === null) {
        const current = await session.read({ nodeId, attributeId: AttributeIds.Value });
        dataType = current.value?.dataType ?? null;
    }
    const value = toVariant(step.value, dataType);
    const statusCode = await session.write({ nodeId, attributeId: AttributeIds.Value, value: { value } });
    return { ok: statusCode.isGood(), statusCode: statusCode.name };
}

async function inputArgumentTypes(methodPath) {
    try {
        const nodeId = await resolvePath([...methodPath, "0:InputArguments"]);
        const dataValue = await session.read({ nodeId, attributeId: AttributeIds.Value });
        const args = dataValue.value?.value || [];
        return Array.from(args, (a) => ({ dataType: dataTypeFromNodeId(a.dataType), valueRank: a.valueRank }));
    } catch {
        return [];
    }
}

async function stepCall(step) {
    const objectId = await resolvePath(step.path);
    const methodPath = [...(step.path || []), step.method];
    const methodId = await resolvePath(methodPath);
    const args = step.args || [];
    const types = args.length ? await inputArgumentTypes(methodPath) : [];
    const inputArguments = args.map((a, i) => toVariant(a, types[i]?.dataType, types[i]?.valueRank));
    const tCall = performance.now();
    const result = await session.call({ objectId, methodId, inputArguments });
    return {
        ok: result.statusCode.isGood(),
        statusCode: result.statusCode.name,
        outputArguments: (result.outputArguments || []).map(variantToJson),
        inputArgumentResults: (result.inputArgumentResults || []).map((s) => s.name),
        callSeconds: since(tCall),
    };
}

async function stepSubscribe(step) {
    const nodeId = await resolvePath(step.path);
    const tStart = performance.now();
    const values = [];
    const item = await monitor(
        { nodeId, attributeId: AttributeIds.Value },
        { samplingInterval: step.samplingInterval ?? 50, discardOldest: true, queueSize: 1000 },
        (dataValue) => values.push(dataValueToJson(dataValue, tStart)),
    );
    const finish = async () => {
        // `until`: stop as soon as that many values came (a busy machine can be slow to change a value)
        const deadline = tStart + (step.seconds ?? 5) * 1000;
        while (performance.now() < deadline && !(step.until && values.length >= step.until)) {
            await sleep(Math.min(50, deadline - performance.now()));
        }
        await item.terminate().catch(() => {});
        return { ok: true, nodeId: nodeId.toString(), values };
    };
    return step.background ? { finish } : finish();
}

const EVENT_FIELDS = ["EventId", "EventType", "SourceName", "Time", "Message", "Severity"];

async function stepEvents(step) {
    const nodeId = await resolvePath(step.path);
    const fields = step.fields || EVENT_FIELDS;
    const tStart = performance.now();
    const events = [];
    const item = await monitor(
        { nodeId, attributeId: AttributeIds.EventNotifier },
        { samplingInterval: 0, discardOldest: true, queueSize: 10000, filter: constructEventFilter(fields) },
        (eventFields) => {
            const event = { t: since(tStart) };
            fields.forEach((name, i) => {
                event[name] = variantToJson(eventFields[i]);
            });
            if (event.EventId !== undefined) delete event.EventId; // opaque bytes, no use to a test
            events.push(event);
        },
    );
    const finish = async () => {
        const remaining = (step.seconds ?? 3) * 1000 - (performance.now() - tStart);
        if (remaining > 0) await sleep(remaining);
        await item.terminate().catch(() => {});
        return { ok: true, nodeId: nodeId.toString(), events };
    };
    return step.background ? { finish } : finish();
}

async function stepWaitValue(step) {
    const nodeId = await resolvePath(step.path);
    const tStart = performance.now();
    const values = [];
    let matched;
    const done = new Promise((resolve) => {
        matched = resolve;
    });
    const item = await monitor(
        { nodeId, attributeId: AttributeIds.Value },
        { samplingInterval: step.samplingInterval ?? 50, discardOldest: true, queueSize: 100 },
        (dataValue) => {
            const v = dataValueToJson(dataValue, tStart);
            values.push(v);
            if (sameValue(v.value, step.equals)) matched(v);
        },
    );
    const timeoutMs = (step.timeout ?? 10) * 1000;
    const hit = await Promise.race([done, sleep(timeoutMs).then(() => null)]);
    await item.terminate().catch(() => {});
    const last = values.length ? values[values.length - 1].value : null;
    return {
        ok: hit !== null,
        timedOut: hit === null,
        seconds: hit !== null ? hit.t : since(tStart),
        value: hit !== null ? hit.value : last,
        values: values.map((v) => v.value),
    };
}

async function stepSleep(step) {
    await sleep((step.seconds ?? 1) * 1000);
    return { ok: true };
}

const STEPS = {
    browse: stepBrowse,
    read: stepRead,
    write: stepWrite,
    call: stepCall,
    subscribe: stepSubscribe,
    events: stepEvents,
    wait_value: stepWaitValue,
    sleep: stepSleep,
};

// ----------------------------------------------------------------------------------------------- main

const output = { connected: false, results: [] };
let pkiDir = null;
let client = null;
let certificateManager = null;

async function cleanup() {
    try {
        if (subscription) await Promise.race([subscription.terminate(), sleep(2000)]);
    } catch { /* ignore */ }
    try {
        if (session) await Promise.race([session.close(), sleep(2000)]);
    } catch { /* ignore */ }
    try {
        if (client) await Promise.race([client.disconnect(), sleep(2000)]);
    } catch { /* ignore */ }
    try {
        if (certificateManager) await certificateManager.dispose();
    } catch { /* ignore */ }
    if (pkiDir) rmSync(pkiDir, { recursive: true, force: true });
}

function copyInto(dir, file, base, pemMarker) {
    // node-opcua reads a certificate as DER only when the file name ends in .der: copy under a name that fits.
    const bytes = readFileSync(file);
    const isPem = bytes.subarray(0, 64).toString("latin1").includes(pemMarker);
    const target = path.join(dir, `${base}.${isPem ? "pem" : "der"}`);
    writeFileSync(target, bytes);
    return target;
}

async function main() {
    const watchdogSeconds = script.timeout ?? 55;
    const watchdog = setTimeout(() => {
        output.error = output.error || `script timeout after ${watchdogSeconds} s`;
        output.timedOut = true;
        answer(output);
    }, watchdogSeconds * 1000);
    watchdog.unref();

    const securityMode = MessageSecurityMode[script.securityMode ?? "None"];
    const securityPolicy = SecurityPolicy[script.securityPolicy ?? "None"];
    if (securityMode === undefined) throw new Error(`unknown securityMode ${script.securityMode}`);
    if (securityPolicy === undefined) throw new Error(`unknown securityPolicy ${script.securityPolicy}`);

    pkiDir = mkdtempSync(path.join(tmpdir(), "opcua-node-client-"));
    certificateManager = new OPCUACertificateManager({
        rootFolder: path.join(pkiDir, "pki"),
        automaticallyAcceptUnknownCertificate: script.acceptServerCertificate ?? true,
        disableFileWatchers: true,
    });
    await certificateManager.initialize();
    if (script.trustServerCertificate) {
        await certificateManager.trustCertificate(readFileSync(script.trustServerCertificate));
    }

    const options = {
        applicationName: script.applicationName ?? "MagnetSorterNodeTestClient",
        applicationUri: script.applicationUri,
        clientName: "node-opcua-test-client",
        securityMode,
        securityPolicy,
        clientCertificateManager: certificateManager,
        endpointMustExist: true,
        keepSessionAlive: true,
        requestedSessionTimeout: 60000,
        connectionStrategy: {
            maxRetry: script.maxRetry ?? 1,
            initialDelay: 200,
            maxDelay: 1000,
        },
        transportTimeout: (script.connectTimeout ?? 10) * 1000,
    };
    if (script.certificate) {
        options.certificateFile = copyInto(pkiDir, script.certificate, "client_certificate", "-----BEGIN CERTIFICATE");
    }
    if (script.privateKey) {
        options.privateKeyFile = copyInto(pkiDir, script.privateKey, "client_private_key", "-----BEGIN");
    }
    if (script.certificate && !script.privateKey) throw new Error("certificate given without privateKey");

    client = OPCUAClient.create(options);
    client.on("backoff", (retry, delay) => console.error(`connect: retry ${retry} in ${delay} ms`));

    const userIdentity = script.userName
        ? { type: UserTokenType.UserName, userName: script.userName, password: script.password ?? "" }
        : { type: UserTokenType.Anonymous };

    try {
        await client.connect(script.endpoint);
        session = await client.createSession(userIdentity);
    } catch (err) {
        output.connected = false;
        output.error = statusName(err);
        output.message = String(err.message || err).trim().slice(0, 2000);
        return;
    }
    output.connected = true;
    output.securityMode = MessageSecurityMode[client.securityMode];
    output.securityPolicy = String(client.securityPolicy).split("#").pop();

    if (script.namespace) {
        const namespaces = await session.readNamespaceArray();
        nsIndex = namespaces.indexOf(script.namespace);
        output.namespaceIndex = nsIndex >= 0 ? nsIndex : null;
        if (nsIndex < 0) {
            output.error = `namespace ${script.namespace} not on the server (has: ${namespaces.join(", ")})`;
            nsIndex = null;
        }
    }

    for (const step of script.steps || []) {
        const entry = { op: step.op };
        if (step.path) entry.path = step.path;
        if (step.method) entry.method = step.method;
        output.results.push(entry);
        const run = STEPS[step.op];
        const tStep = performance.now();
        try {
            if (!run) throw new Error(`unknown op ${step.op}`);
            const result = await run(step);
            if (result && typeof result.finish === "function") {
                entry.background = true;
                background.push({ entry, finish: result.finish });
            } else {
                Object.assign(entry, result);
            }
        } catch (err) {
            // a service fault (e.g. BadUserAccessDenied for the whole Call) is reported like a result status
            const name = err.statusName || statusName(err);
            Object.assign(entry, { ok: false, error: name, message: String(err.message || err) });
            if (/^Bad[A-Za-z]+$/.test(name)) entry.statusCode = name;
        }
        entry.stepSeconds = since(tStep);
    }
    for (const { entry, finish } of background) {
        try {
            Object.assign(entry, await finish());
        } catch (err) {
            Object.assign(entry, { ok: false, error: statusName(err), message: String(err.message || err) });
        }
    }
    if (client.isReconnecting) output.reconnecting = true;
}

if (script) {
    try {
        await main();
    } catch (err) {
        output.error = output.error || statusName(err);
        output.message = String(err.stack || err).slice(0, 2000);
    }
    await Promise.race([cleanup(), sleep(5000)]);
    answer(output);
}
