/*
 * Paddock's wire messages: one numbering for every link.
 *
 * Links: node agent <-> guest agent (virtio-serial), scheduler <-> node agent
 * (mutual TLS over TCP, both directions: the agent's session with the leader
 * and the schedulers' RPC into the agent), scheduler <-> scheduler
 * (forwarding).
 *
 * Framing (frame.h): a 4-byte big-endian length, then one msgpack map. Every
 * map has "t" (the type below, uint) and "id" (a request id, uint, chosen by
 * the side that opens the request; 0 for unsolicited messages). Field names
 * are short lower-case strings, listed beside each type.
 *
 * Conversation rules:
 *  - Each side sends HELLO {v, role, name} first. A peer with another "v" is
 *    refused with ERROR {code: "EPROTO"} and the connection closes.
 *  - A request is answered by OK (fields depend on the request) or ERROR
 *    {code, errno, message} under the same id. Streams send many frames
 *    under one id and end with EXIT, DATA {eof: true}, OK or ERROR.
 *  - Flow control for streams: a sender may have at most PD_STREAM_WINDOW
 *    bytes of DATA/STDOUT/STDERR payload in flight per id; the receiver
 *    grants more with WINDOW {bytes} under that id as it consumes. Thus a
 *    slow reader of one stream never blocks the others on the same link.
 *  - CANCEL under an id ends that request or stream early.
 */
#ifndef PD_MSGTYPES_H
#define PD_MSGTYPES_H

#define PD_PROTO_VERSION 1

/* Largest frame, header included. Larger payloads travel as chunks. */
#define PD_FRAME_MAX (4u << 20)
/* Largest payload in one DATA/STDOUT/STDERR frame. */
#define PD_CHUNK_MAX (1u << 20)
/* Per-stream credit before a WINDOW grant is needed. */
#define PD_STREAM_WINDOW (4u << 20)
/* Deepest nesting of arrays and maps inside a frame. */
#define PD_NEST_MAX 8

/* Adding a type: add it here AND to the names table in msgtypes.c, or the
 * decoder rejects it as unknown. */
enum pd_msg_type {
    /* Every link, 1-99. */
    PD_MSG_HELLO = 1,  /* {v, role: "guest"|"agent"|"scheduler", name} */
    PD_MSG_OK = 2,     /* reply; fields depend on the request */
    PD_MSG_ERROR = 3,  /* {code: "ENOENT".., errno: int, message} */
    PD_MSG_CANCEL = 4, /* {} end the request or stream under this id */
    PD_MSG_WINDOW = 5, /* {bytes} stream credit for this id */
    PD_MSG_PING = 6,   /* {} */
    PD_MSG_PONG = 7,   /* {} */
    PD_MSG_DATA = 8,   /* {data: bin, eof: bool} a chunk of a stream */

    /* Guest agent requests, sent by the host (node agent), 100-199.
     * The node agent's RPC accepts the same types with an extra "sandbox"
     * field naming the target sandbox. */
    PD_MSG_EXEC = 100,      /* {argv: [str] | command: str, cwd, env: {k: v},
                               stdin: bin, timeout_ms, stream: bool,
                               output_max} */
    PD_MSG_EXEC_START = 101, /* {pid} first frame of a streamed exec */
    PD_MSG_STDOUT = 102,     /* {data: bin} */
    PD_MSG_STDERR = 103,     /* {data: bin} */
    PD_MSG_EXIT = 104,       /* {exit_code, signal, timed_out, truncated,
                                duration_ms, stdout: bin, stderr: bin} */
    PD_MSG_STDIN = 105,      /* {data: bin, eof: bool} for a streamed exec */

    PD_MSG_PROC_START = 110,  /* {proc, argv | command, cwd, env} ->
                                 OK {proc, pid} */
    PD_MSG_PROC_LIST = 111,   /* {} -> OK {procs: [proc map]} */
    PD_MSG_PROC_GET = 112,    /* {proc} -> OK {proc: {proc, pid, running,
                                 exit_code, signal, started_ms, ended_ms,
                                 argv}} (the process map nested, as in
                                 PROC_LIST's entries) */
    PD_MSG_PROC_LOGS = 113,   /* {proc, follow: bool} -> STDOUT/STDERR
                                 frames, then OK {skipped} (ended or not
                                 following; skipped: bytes the bounded
                                 ring dropped before they were sent) */
    PD_MSG_PROC_SIGNAL = 114, /* {proc, signal: int} -> OK */
    PD_MSG_PROC_WAIT_PORT = 115, /* {port, timeout_ms} -> OK or ERROR */

    PD_MSG_FILE_WRITE = 120,  /* {path, mode, append: bool} then DATA
                                 frames from the host; -> OK {size} */
    PD_MSG_FILE_READ = 121,   /* {path} -> OK {size, mode} then DATA frames
                                 ending with eof */
    PD_MSG_FILE_STAT = 122,   /* {path} -> OK {type, size, mode, mtime_ms} */
    PD_MSG_FILE_LIST = 123,   /* {path, recursive} -> OK {entries: [{name,
                                 type, size, mode, mtime_ms}]} */
    PD_MSG_FILE_MKDIR = 124,  /* {path, parents: bool, mode} -> OK */
    PD_MSG_FILE_DELETE = 125, /* {path, recursive: bool} -> OK */
    PD_MSG_FILE_RENAME = 126, /* {from, to} -> OK */

    PD_MSG_TUNNEL_OPEN = 140, /* {port} -> OK, then DATA both ways; either
                                 side ends with DATA {eof} or CANCEL */

    PD_MSG_INFO = 150,     /* {} -> OK {kernel, mem_total, mem_free, cpus,
                              disk_total, disk_used, uptime_ms, hostname} */
    PD_MSG_SHUTDOWN = 151, /* {} -> OK, then sync and poweroff */

    /* Node agent RPC, sent by a scheduler, 200-299. (Node agent notes,
     * additive: a "sandbox map" is {sandbox, state, reason, cpus,
     * memory_mb, disk_mb, egress, created_ms, ready_ms, pid, accel,
     * ports: [{port, host_port}]}; CREATE, STATUS and a create's wait
     * answer with its fields at the top level of the OK. CREATE takes
     * "wait": true to answer once running (or ERROR with the reason);
     * the same id and spec again is idempotent, another spec EEXIST.) */
    PD_MSG_SANDBOX_CREATE = 200,  /* {sandbox, cpus, memory_mb, disk_mb, env,
                                     egress, allow: [host], wait}
                                     -> OK {sandbox map} */
    PD_MSG_SANDBOX_DESTROY = 201, /* {sandbox} -> OK */
    PD_MSG_SANDBOX_STATUS = 202,  /* {sandbox} -> OK {sandbox map} */
    PD_MSG_SANDBOX_LIST = 203,    /* {} -> OK {sandboxes: [sandbox map]} */
    PD_MSG_PORT_OPEN = 204,       /* {sandbox, port} -> OK {host_port,
                                     host: "127.0.0.1"} */
    PD_MSG_PORT_CLOSE = 205,      /* {sandbox, port} -> OK */
    PD_MSG_AGENT_INFO = 206,      /* {} -> OK {node, capacity, allocated,
                                     memory_overhead_mb, sandboxes, accel,
                                     cgroup, leader, registered,
                                     egress_requests, egress_denied} */
    PD_MSG_TOKEN_REVOKE = 207,    /* {jti, exp} push of a revoked token */

    /* Node agent session with the leader, sent by the agent, 300-399. */
    PD_MSG_NODE_REGISTER = 300,  /* {node, rpc_addr, cpus, memory_mb,
                                    disk_mb, labels, sandboxes: [..],
                                    token?: a node join token}
                                    -> OK {heartbeat_ms} */
    PD_MSG_NODE_HEARTBEAT = 301, /* {node, allocated..} -> OK */
    PD_MSG_NODE_REDIRECT = 302,  /* scheduler -> agent: {leader_addr} */
    PD_MSG_SANDBOX_STATE = 303,  /* {sandbox, state, reason} */

    /* Scheduler to scheduler, 400-499. */
    PD_MSG_FORWARD = 400, /* {method, path, headers, body} -> OK {status,
                             headers, body} : a write forwarded to the
                             leader */
    PD_MSG_SANDBOX_ENSURE = 401, /* {sandbox} -> OK {replaced: bool, node,
                                    generation} once it runs: a follower
                                    asks the leader to place a lost
                                    sandbox again (scheduler/lifecycle.c) */

    PD_MSG_TYPE_MAX = 499,
};

/* True when t is one of the numbers above. */
int pd_msg_type_known(unsigned long long t);

/* A short name for logs ("EXEC"), or "UNKNOWN". */
const char *pd_msg_type_name(unsigned long long t);

#endif
