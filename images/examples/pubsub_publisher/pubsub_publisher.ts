// pubsub_publisher: publishes each request's body on pub/sub component `pub_subs_demo` (the
// host's default pub/sub component, Layotto's demo name; capability: pubsub), written on the
// Layotto AssemblyScript SDK.
//
//     POST /                       body = the message   -> pub_subs_demo, topic `orders`
//     POST /?topic=t&pubsub=p      body = the message   -> component `p`, topic `t`
//     GET  /?msg=hello                                  -> topic `orders`, message "hello"
//
// Answers 200 "published <n> bytes to <pubsub>/<topic>", 400 without a message, 502 when the
// publish fails. pubsub_subscriber (topic `orders`) stores what it receives.
import { Request, Response, handle, publish, statusName, utf8, log, Level } from "../../../abi/assemblyscript/assembly/layotto";
export { layotto_http_handle, proxy_on_memory_allocate } from "../../../abi/assemblyscript/assembly/layotto";

handle((req: Request): Response => {
  const pubsub = req.queryParam("pubsub", "pub_subs_demo")!;
  const topic = req.queryParam("topic", "orders")!;
  let data = req.body;
  if (data.length == 0) {
    const msg = req.queryParam("msg");
    if (msg == null || msg.length == 0) {
      return Response.text("nothing to publish: send a body or ?msg=\n").setStatus(400);
    }
    data = utf8(msg);
  }
  const rc = publish(pubsub, topic, data);
  if (rc != 0) {
    log(Level.WARN, "publish to " + pubsub + "/" + topic + ": " + statusName(rc));
    return Response.text("publish failed: " + statusName(rc) + "\n").setStatus(502);
  }
  return Response.text("published " + data.length.toString() + " bytes to " + pubsub + "/" + topic + "\n");
});
