// faas_fn1_as: Layotto's FaaS demo function_1 (id `id_1`) on the Layotto AssemblyScript SDK
// (the same behaviour as the C faas_fn1).
//
//     GET /?name=book1  -> invoke("id_2", "", "book1") -> "There are 100 inventories for book1."
//
// `name` comes from the query string, else from a `name=...` body (Layotto's demo sends the
// query string as the body). 400 without a name, 404 when id_2 or the book is unknown.
import { Request, Response, handle, invoke, lastStatus, statusName, text, utf8, queryParam, Status } from "../../../abi/assemblyscript/assembly/layotto";
export { layotto_http_handle, proxy_on_memory_allocate } from "../../../abi/assemblyscript/assembly/layotto";

handle((req: Request): Response => {
  let name = req.queryParam("name");
  if (name == null || name.length == 0) name = queryParam(req.bodyText(), "name");
  if (name == null || name.length == 0) {
    return Response.text("missing the name parameter\n").setStatus(400);
  }
  const inventory = invoke("id_2", "", utf8(name));
  if (inventory == null) {
    const rc = lastStatus();
    return Response.text("id_2 failed: " + statusName(rc) + "\n").setStatus(rc == Status.NOT_FOUND ? 404 : 502);
  }
  return Response.text("There are " + text(inventory) + " inventories for " + name + ".");
});
