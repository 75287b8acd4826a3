-- Argo CD health check for chatgate.dev/ChatService.
--
-- Reads what the operator writes, by the kstatus rules Flux and Helm 4 also use:
-- a status older than the spec (observedGeneration behind metadata.generation) is
-- still Progressing; Stalled=True is Degraded (invalid configuration, a missing
-- Secret, pods failing startup, a progress deadline); Reconciling=True is
-- Progressing (a rollout); Ready=True is Healthy. The message is the operator's own
-- (Stalled's or Ready's), which names the key, the pod or the critical service.
local hs = { status = "Progressing", message = "Waiting for the chatgate operator to observe the ChatService" }
if obj.status == nil then
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the chatgate operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = {}
for _, c in ipairs(obj.status.conditions or {}) do
  -- A condition written for an older generation says nothing about this spec.
  if c.observedGeneration == nil or generation == nil or c.observedGeneration >= generation then
    conditions[c.type] = c
  end
end

local stalled = conditions["Stalled"]
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
  return hs
end

local reconciling = conditions["Reconciling"]
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = (reconciling.reason or "Reconciling") .. ": " .. (reconciling.message or "")
  return hs
end

local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or ""
  return hs
end
if ready ~= nil then
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
end
return hs
