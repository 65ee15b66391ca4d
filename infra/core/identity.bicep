// The user-assigned managed identity the function app runs as. Roles are granted in app/rbac.bicep, so they exist
// before the app is created (a system-assigned identity would only exist with the app, and its first start would
// race the role assignments).

param name string
param location string = resourceGroup().location
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
